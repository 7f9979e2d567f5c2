//! Packs a folder with the given options and prints the time and size (for tuning).
//! `packopt SRC DEST [block_mib] [threads] [dict_mib] [sort 0|1] [block_files]`
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let mut o = ams_archive::PackOptions::default();
    let num = |i: usize| a.get(i).and_then(|v| v.parse::<u64>().ok());
    if let Some(v) = num(3) {
        o.block_bytes = v << 20;
    }
    if let Some(v) = num(4) {
        o.threads = v as usize;
    }
    if let Some(v) = num(5) {
        o.dict_bytes = (v << 20) as u32;
    }
    if let Some(v) = num(6) {
        o.sort_by_type = v == 1;
    }
    if let Some(v) = num(7) {
        o.block_files = v as usize;
    }
    let t = std::time::Instant::now();
    let s = ams_archive::pack_dir_with(a[1].as_ref(), a[2].as_ref(), &o).unwrap();
    let size = std::fs::metadata(&a[2]).unwrap().len();
    println!(
        "block {} MiB, {} threads, dict {} MiB, sort {}, files {}: {:.2} s, {} bytes ({} files)",
        o.block_bytes >> 20,
        o.threads,
        o.dict_bytes >> 20,
        o.sort_by_type,
        o.block_files,
        t.elapsed().as_secs_f64(),
        size,
        s.files
    );
}
