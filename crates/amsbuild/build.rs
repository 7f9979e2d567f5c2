//! Link-time layout of the release binary.
//!
//! The host's start and its idle loop run a few thousand functions spread over the whole code
//! segment, and the kernel maps 64 KiB of the file around each page a process touches: a host
//! that had only started kept nearly all of its code mapped (BENCHMARKS.md (c)).
//! `symbol-order.txt` lists the functions a release host runs from its start until it is idle
//! and stopped, and the linker places them first, side by side, so they share pages.
//! `scripts/symbol-order.py` writes the list again from a run of the release binary.
//!
//! A name the list has and the binary lacks (another compiler or dependency version) is
//! skipped, so a stale list only makes the layout less tight. The ordering is an option of
//! LLD, the linker Rust uses for `x86_64-unknown-linux-gnu` since 1.90 (and of mold);
//! `AMS_SYMBOL_ORDER=off` leaves it out for a build that links with another linker.

use std::env;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=symbol-order.txt");
    println!("cargo:rerun-if-env-changed=AMS_SYMBOL_ORDER");
    println!("cargo:rerun-if-env-changed=AMS_LINK_MAP");
    // `scripts/symbol-order.py` reads where each function landed from the linker's map.
    if let Ok(map) = env::var("AMS_LINK_MAP") {
        println!("cargo:rustc-link-arg-bins=-Wl,-Map={map}");
    }
    let target = env::var("TARGET").unwrap_or_default();
    let profile = env::var("PROFILE").unwrap_or_default();
    let off = env::var("AMS_SYMBOL_ORDER").is_ok_and(|v| v == "off");
    if target != "x86_64-unknown-linux-gnu" || profile != "release" || off {
        return;
    }
    let dir = env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let list = Path::new(&dir).join("symbol-order.txt");
    if list.is_file() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            list.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
