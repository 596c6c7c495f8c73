//! The shape of the code base, checked: which crate may depend on which,
//! where the wire format lives, and that the engine's migration module has
//! no import cycles between its files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `[dependencies]` names of a workspace crate's Cargo.toml.
fn dependencies(krate: &str) -> Vec<String> {
    let toml = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).unwrap();
    let mut deps = Vec::new();
    let mut in_deps = false;
    for line in toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
        } else if in_deps {
            if let Some((name, _)) = line.split_once(['=', '.']) {
                deps.push(name.trim().to_string());
            }
        }
    }
    deps
}

/// Workspace crates reachable from `krate` through `[dependencies]`.
fn workspace_closure(krate: &str) -> BTreeSet<String> {
    let dirs: BTreeMap<&str, &str> = [
        ("ferry-guest", "guest"),
        ("ferry-protocol", "protocol"),
        ("ferry-transport", "transport"),
        ("ferry-page-server", "page-server"),
        ("ferry-engine", "engine"),
        ("ferry-tools", "tools"),
    ]
    .into_iter()
    .collect();
    let mut seen = BTreeSet::new();
    let mut todo = vec![krate.to_string()];
    while let Some(k) = todo.pop() {
        for d in dependencies(dirs[k.as_str()]) {
            if dirs.contains_key(d.as_str()) && seen.insert(d.clone()) {
                todo.push(d);
            }
        }
    }
    seen
}

#[test]
fn the_vmm_does_not_depend_on_the_workload_guest() {
    let engine = workspace_closure("ferry-engine");
    assert!(!engine.contains("ferry-guest"), "{engine:?}");
    assert!(engine.contains("ferry-protocol"), "{engine:?}");
    assert!(engine.contains("ferry-transport"), "{engine:?}");
    // Dependencies point one way: protocol, transport <- page-server <-
    // engine <- tools; the wire format and the connections know nothing of
    // each other.
    assert!(workspace_closure("ferry-protocol").is_empty());
    assert!(workspace_closure("ferry-transport").is_empty());
    assert_eq!(
        workspace_closure("ferry-page-server"),
        BTreeSet::from(["ferry-protocol".to_string(), "ferry-transport".to_string()])
    );
    assert!(workspace_closure("ferry-tools").contains("ferry-guest"));
}

/// Rust files under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

#[test]
fn only_the_protocol_crate_lays_out_frames() {
    for dir in [
        "engine/src",
        "page-server/src",
        "transport/src",
        "tools/src",
    ] {
        for f in rust_files(&root().join(dir)) {
            let text = std::fs::read_to_string(&f).unwrap();
            for needle in ["FrameHeader {", "FrameHeader::decode", "HELLO_MAGIC"] {
                assert!(!text.contains(needle), "{} has {needle}", f.display());
            }
        }
    }
}

/// The sibling modules a file of `engine/src/migration` imports.
fn migration_imports(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for prefix in ["super::", "crate::migration::"] {
        for (i, _) in text.match_indices(prefix) {
            let rest = &text[i + prefix.len()..];
            // `super::{a, b::C}` names several modules at once.
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group[..group.find('}').unwrap_or(group.len())]
                    .split(',')
                    .collect(),
                None => vec![rest],
            };
            for n in names {
                let name: String = n
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if modules.contains(&name) {
                    out.insert(name);
                }
            }
        }
    }
    out
}

#[test]
fn the_migration_module_has_no_import_cycles() {
    let dir = root().join("engine/src/migration");
    let files: BTreeMap<String, String> = rust_files(&dir)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "mod.rs"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    assert!(modules.len() > 10, "{modules:?}");
    let edges: BTreeMap<String, BTreeSet<String>> = files
        .iter()
        .map(|(m, text)| {
            let mut deps = migration_imports(text, &modules);
            deps.remove(m);
            (m.clone(), deps)
        })
        .collect();
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = path.iter().position(|p| p == m) {
            panic!("import cycle: {:?} -> {m}", &path[at..]);
        }
        path.push(m.to_string());
        for d in &edges[m] {
            visit(d, edges, path, done);
        }
        path.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in edges.keys() {
        visit(m, &edges, &mut Vec::new(), &mut done);
    }
    // The checker sees real edges (it is not vacuous).
    assert!(edges["dest"].contains("install"), "{edges:?}");
    assert!(edges["source"].contains("rounds"), "{edges:?}");
}
