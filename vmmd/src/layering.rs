//! The layering rule, checked: a module imports only from its own layer or below (see the crate
//! documentation). Doc comments and tests may name anything.

use std::path::Path;

/// Each top-level module's layer, bottom up.
const LAYERS: &[(&str, u8)] = &[
    ("sys", 1),
    ("persist", 1),
    ("notify", 1),
    ("memory", 2),
    ("vcpu", 2),
    ("devices", 2),
    ("console", 2),
    ("vfio", 2),
    ("boot", 2),
    ("state", 3),
    ("vm", 4),
    ("migration", 5),
    ("cpr", 5),
    ("api", 6),
    ("config", 6),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// `crate::X` paths in the code of `src` (comments and `#[cfg(test)]` parts left out).
fn imports(src: &str) -> Vec<String> {
    let code = src.split("#[cfg(test)]").next().unwrap_or("");
    let mut out = Vec::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
        }
    }
    out
}

fn visit(dir: &Path, root: &Path, found: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            visit(&path, root, found);
            continue;
        }
        if path.extension().is_none_or(|x| x != "rs") {
            continue;
        }
        let Ok(rel) = path.strip_prefix(root) else {
            continue;
        };
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or("")
            .trim_end_matches(".rs")
            .to_string();
        let Some(mine) = layer(&top) else {
            continue;
        };
        let src = std::fs::read_to_string(&path).unwrap_or_default();
        for target in imports(&src) {
            if let Some(theirs) = layer(&target).filter(|l| *l > mine) {
                found.push(format!(
                    "{}: {top} (layer {mine}) imports crate::{target} (layer {theirs})",
                    rel.display()
                ));
            }
        }
    }
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    visit(&root, &root, &mut found);
    found.sort();
    found.dedup();
    assert!(
        found.is_empty(),
        "imports that run up:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_checker_sees_an_upward_import() {
    let src = "use crate::vm::Vm;\n// crate::api in a comment\nfn f() { crate::cpr::x(); }\n";
    assert_eq!(imports(src), ["vm", "cpr"]);
    assert!(layer("vm") > layer("devices"));
}
