//! `deploy/prometheus/alerts.yml`, the metric catalogue (`docs/operations/metrics.md`)
//! and the code agree: every alert is well formed and uses only catalogued series, every
//! catalogued series is one the code exports, and every series the code exports is
//! catalogued.

use std::collections::BTreeSet;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// `portcullis_*` names in `text`, histogram suffixes folded into their family.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.match_indices("portcullis_")
        .map(|(at, _)| name_at(&text[at..]))
        .collect()
}

/// The metric name `text` starts with, a histogram suffix folded into its family.
fn name_at(text: &str) -> String {
    let end = text
        .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .unwrap_or(text.len());
    let mut name = &text[..end];
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && base.ends_with("_seconds")
        {
            name = base;
        }
    }
    name.to_owned()
}

fn catalogue() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("docs/operations/metrics.md")).unwrap();
    // only the tables' first column counts as a definition
    text.lines()
        .filter(|l| l.starts_with("| `portcullis_"))
        .flat_map(|l| metric_names(l.split('|').nth(1).unwrap()))
        .collect()
}

fn source_text() -> String {
    let mut all = String::new();
    for dir in ["gateway/src", "keyrotation/src", "config-center/src"] {
        let mut stack = vec![root().join(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    all.push_str(&std::fs::read_to_string(&p).unwrap());
                }
            }
        }
    }
    all
}

#[test]
fn every_alert_is_well_formed_and_uses_only_catalogued_metrics() {
    let text = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap();
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
    let groups = docs[0]["groups"].as_vec().expect("a list of groups");
    let catalogue = catalogue();
    let mut alerts = BTreeSet::new();
    for group in groups {
        assert!(group["name"].as_str().is_some());
        for rule in group["rules"].as_vec().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            assert!(alerts.insert(name.to_owned()), "{name} twice");
            let expr = rule["expr"].as_str().expect("an expr");
            assert!(
                matches!(rule["labels"]["severity"].as_str(), Some("page" | "ticket")),
                "{name}: severity page or ticket"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name}: summary"
            );
            let used = metric_names(expr);
            assert!(
                !used.is_empty() || expr.contains("up{"),
                "{name}: no metric"
            );
            for m in used {
                assert!(
                    catalogue.contains(&m),
                    "{name} uses {m}, which metrics.md does not list"
                );
            }
        }
    }
    assert!(alerts.len() >= 10, "{alerts:?}");
}

/// The anchor GitHub gives a Markdown heading's text.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of `markdown`'s headings, fenced code left out (a shell comment is not one).
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut found = BTreeSet::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced
            && let Some(text) = line.trim_start_matches('#').strip_prefix(' ')
            && line.starts_with('#')
        {
            found.insert(anchor(text));
        }
    }
    found
}

/// A runbook is where the one paged goes first: every alert has one (the trail's alerts
/// share `docs/operations/audit.md#runbook`; those without a page of their own are under
/// `docs/operations/runbook.md#alerts`), and every runbook named is a document of the
/// repository and, after a `#`, one of its headings.
#[test]
fn every_alert_has_a_runbook_and_every_runbook_named_exists() {
    let text = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap();
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
    let mut without_one = Vec::new();
    for rule in docs[0]["groups"]
        .as_vec()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_vec().unwrap())
    {
        let name = rule["alert"].as_str().unwrap();
        let Some(runbook) = rule["annotations"]["runbook"].as_str() else {
            without_one.push(name);
            continue;
        };
        let (path, heading) = match runbook.split_once('#') {
            Some((path, heading)) => (path, Some(heading)),
            None => (runbook, None),
        };
        let doc = std::fs::read_to_string(root().join(path))
            .unwrap_or_else(|e| panic!("{name}: runbook {runbook}: {e}"));
        if let Some(heading) = heading {
            assert!(
                anchors(&doc).contains(heading),
                "{name}: runbook {runbook}: {path} has no heading #{heading}"
            );
        }
    }
    assert!(
        without_one.is_empty(),
        "alerts without a runbook: {without_one:?}"
    );
}

#[test]
fn every_catalogued_metric_is_exported_by_the_code() {
    let source = source_text();
    for m in catalogue() {
        assert!(
            source.contains(&format!("\"{m}\"")),
            "metrics.md lists {m}, which no code exports"
        );
    }
}

/// `"portcullis_…"` string literals in the source that are not metrics.
const NOT_METRICS: &[&str] = &[
    // the Postgres NOTIFY channel of the config change feed
    "portcullis_config",
];

#[test]
fn every_metric_the_code_exports_is_catalogued() {
    let source = source_text();
    let catalogue = catalogue();
    // the names in string literals: what the `metrics` macros (or a constant they take) get
    let exported: BTreeSet<String> = source
        .match_indices("\"portcullis_")
        .map(|(at, _)| name_at(&source[at + 1..]))
        .filter(|m| !NOT_METRICS.contains(&m.as_str()))
        .collect();
    let missing: Vec<&String> = exported.difference(&catalogue).collect();
    assert!(
        missing.is_empty(),
        "exported but not in docs/operations/metrics.md: {missing:?}"
    );
}
