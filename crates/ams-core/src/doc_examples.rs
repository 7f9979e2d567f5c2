//! The examples of `docs/` parse: every code block marked `<!-- parse: FILE -->` on the line
//! before its fence goes through the parser of FILE, so a documented example can never drift
//! into one the host refuses.

use crate::{notify, pipeline, private_config, webconf, webhooks};

/// The blocks of a Markdown text that follow a `<!-- parse: FILE -->` line: (FILE, text).
fn marked_blocks(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(file) = line
            .trim()
            .strip_prefix("<!-- parse:")
            .and_then(|r| r.strip_suffix("-->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.trim_start().starts_with("```"),
            "`{line}` is not followed by a code block"
        );
        let body: Vec<&str> = lines
            .by_ref()
            .take_while(|l| !l.trim_start().starts_with("```"))
            .collect();
        out.push((file.trim().to_string(), body.join("\n")));
    }
    out
}

fn check(file: &str, text: &str) -> Result<(), String> {
    let e = |e: crate::ConfigError| e.to_string();
    match file {
        "pipeline.json" => {
            let p = pipeline::parse(text).map_err(e)?;
            if !p.warnings.is_empty() {
                return Err(format!("warnings: {:?}", p.warnings));
            }
        }
        "webhooks.json" => {
            let cfg = webhooks::WebhooksConfig::parse(text).map_err(e)?;
            notify::parse_out_webhooks(&cfg.out_webhooks).map_err(e)?;
        }
        "webhook_fields.json" => {
            webhooks::WebhookFields::parse(text).map_err(e)?;
        }
        "pipeline-config.json" => {
            private_config::PrivateConfig::parse(text).map_err(e)?;
        }
        "web_conf.json" => {
            webconf::WebConf::parse(text, file).map_err(e)?;
        }
        other => return Err(format!("no parser for `{other}`")),
    }
    Ok(())
}

#[test]
fn documented_examples_parse() {
    let docs = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs");
    let mut checked = 0;
    for name in [
        "pipeline.json.md",
        "webhooks.md",
        "pipeline-config.md",
        "web_conf.md",
    ] {
        let path = format!("{docs}/{name}");
        let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        for (i, (file, text)) in marked_blocks(&doc).into_iter().enumerate() {
            if let Err(why) = check(&file, &text) {
                panic!(
                    "{name}: example {} ({file}) does not parse: {why}\n{text}",
                    i + 1
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} examples were checked");
}
