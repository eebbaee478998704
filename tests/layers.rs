//! Modules only look down: the layers declared in the crate doc ("Layers" in
//! src/lib.rs) hold for every `crate::` and `super::` path in `src/`.
//!
//! A cheap stand-in for `cargo modules dependencies --acyclic`: it reads the
//! sources as tokens, drops comments, literals and `#[cfg(test)]` items,
//! resolves each path to the module it names (through `pub use` re-exports),
//! and names file and line of every path that goes sideways or up.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A module's path below the crate root: `[]` is the crate, `["config", "raw"]`.
type ModPath = Vec<String>;

#[test]
fn modules_only_use_the_layers_below_their_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let violations = check(&src);
    assert!(violations.is_empty(), "layers broken:\n{}", violations.join("\n"));
}

/// The check on a small crate: an upward use, a sideways one hidden behind
/// a re-export and an undeclared module are named; the same paths in a doc
/// comment, a string or test code are not.
#[test]
fn wrong_uses_are_named_with_file_and_line() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("low")).expect("create src/low");
    let write = |name: &str, text: &str| std::fs::write(src.join(name), text).expect("write a source file");
    write(
        "lib.rs",
        "//! ```text\n//! crate  top\n//!        mid\n//!        low\n//! low    b\n//!        a\n//! ```\n\
         pub mod top;\npub mod mid;\npub mod low;\npub mod extra;\n",
    );
    write("top.rs", "use crate::low::A;\nuse crate::mid::Mid;\n");
    write("mid.rs", "pub struct Mid;\n");
    write("extra.rs", "");
    write("low/mod.rs", "mod a;\nmod b;\npub use a::A;\npub use b::B;\n");
    write("low/b.rs", "use super::A;\npub struct B;\n");
    write(
        "low/a.rs",
        "/// Not a use: crate::top::Top\npub struct A;\nconst S: &str = \"crate::top\";\n\
         fn f() -> crate::mid::Mid { todo!() }\nuse super::B;\n\
         #[cfg(test)]\nmod tests {\n    use crate::top::Top;\n}\n",
    );
    let found = check(&src);
    let expected = [
        "src/lib.rs: `extra` is missing from the layers of `crate`",
        "src/low/a.rs:4: low uses mid, which is not below it (`crate::mid::Mid`)",
        "src/low/a.rs:5: a uses b, which is not below it (`super::B`)",
    ];
    assert_eq!(found, expected);
}

// === the check ===

/// Every use that breaks the declared layers, as `file:line: what`.
fn check(src: &Path) -> Vec<String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    let layers = declared_layers(&lib);
    let mut files = BTreeMap::new();
    collect_modules(src, &src.join("lib.rs"), ModPath::new(), &mut files);
    let tree: BTreeMap<ModPath, Vec<Token>> =
        files.iter().map(|(module, file)| (module.clone(), code_tokens(file))).collect();
    let exports = re_exports(&tree);
    let mut found = Vec::new();
    for (parent, children) in children_of(&tree) {
        let Some(order) = layers.get(&parent) else { continue };
        for child in children.into_iter().filter(|c| !order.contains_key(*c)) {
            found.push(format!(
                "{}: `{child}` is missing from the layers of `{}`",
                shown(src, &files[&ModPath::new()]),
                name(&parent)
            ));
        }
    }
    for (module, tokens) in &tree {
        for (path, line) in paths(tokens) {
            let Some(target) = resolve(&tree, &exports, module, &path) else { continue };
            if let Some(problem) = judge(&layers, module, &target) {
                let file = shown(src, &files[module]);
                found.push(format!("{file}:{line}: {problem} (`{}`)", path.join("::")));
            }
        }
    }
    found
}

/// Why `module` may not use `target`, if it may not.
fn judge(layers: &Layers, module: &ModPath, target: &ModPath) -> Option<String> {
    let common = module.iter().zip(target).take_while(|(a, b)| a == b).count();
    // A module's own items, its ancestors' and its descendants' are all fine.
    if common == module.len() || common == target.len() {
        return None;
    }
    let parent = &module[..common];
    let (from, to) = (&module[common], &target[common]);
    let Some(order) = layers.get(parent) else {
        return Some(format!("{from} uses {to}: declare the layers of `{}` in the crate doc", name(parent)));
    };
    let (Some(from_at), Some(to_at)) = (order.get(from), order.get(to)) else {
        return Some(format!("{from} uses {to}, and the layers of `{}` miss one of them", name(parent)));
    };
    let looks_down = to_at.line > from_at.line || (from_at.group.is_some() && from_at.group == to_at.group);
    (!looks_down).then(|| format!("{from} uses {to}, which is not below it"))
}

/// `file` as `src/...`.
fn shown(src: &Path, file: &Path) -> String {
    file.strip_prefix(src.parent().unwrap_or(src)).unwrap_or(file).display().to_string()
}

fn name(module: &[String]) -> String {
    if module.is_empty() { "crate".into() } else { module.join("::") }
}

// === the declared layers ===

/// Where a module stands among its siblings.
#[derive(Clone, Copy)]
struct Place {
    /// Line of its layer, counted from the top.
    line: usize,
    /// Its `a+b` group: modules that still use each other.
    group: Option<usize>,
}

/// Per parent module, where each declared child stands.
type Layers = HashMap<ModPath, HashMap<String, Place>>;

/// Reads the ```text block of the crate doc: a name in the first column
/// opens a parent (`crate` for the top level), each line is one layer.
fn declared_layers(lib: &str) -> Layers {
    let doc: Vec<&str> =
        lib.lines().filter_map(|l| l.strip_prefix("//!")).map(|l| l.strip_prefix(' ').unwrap_or(l)).collect();
    let start = doc.iter().position(|l| *l == "```text").expect("a ```text block of layers in the crate doc");
    let mut layers = Layers::new();
    let mut parent = ModPath::new();
    let mut groups = 0;
    for (line, text) in doc[start + 1..].iter().take_while(|l| **l != "```").enumerate() {
        let mut words = text.split_whitespace();
        if !text.starts_with(' ') && !text.is_empty() {
            let opened = words.next().expect("a parent module name");
            parent = opened.split("::").filter(|s| *s != "crate").map(String::from).collect();
        }
        for word in words {
            let group = word.contains('+').then(|| {
                groups += 1;
                groups
            });
            for module in word.split('+') {
                layers.entry(parent.clone()).or_default().insert(module.to_string(), Place { line, group });
            }
        }
    }
    layers
}

// === modules and their files ===

/// Follows `mod name;` declarations (outside test code) from `file`.
fn collect_modules(src: &Path, file: &Path, module: ModPath, files: &mut BTreeMap<ModPath, PathBuf>) {
    let tokens = code_tokens(file);
    let dir = match file.file_name().and_then(|n| n.to_str()) {
        Some("lib.rs" | "mod.rs") => file.parent().unwrap_or(src).to_path_buf(),
        _ => file.with_extension(""),
    };
    files.insert(module.clone(), file.to_path_buf());
    for window in tokens.windows(3) {
        if let [Token { text: kw, .. }, Token { text: child, .. }, Token { text: semi, .. }] = window
            && kw == "mod"
            && semi == ";"
        {
            let flat = dir.join(format!("{child}.rs"));
            let child_file = if flat.exists() { flat } else { dir.join(child).join("mod.rs") };
            let mut path = module.clone();
            path.push(child.clone());
            collect_modules(src, &child_file, path, files);
        }
    }
}

fn children_of(tree: &BTreeMap<ModPath, Vec<Token>>) -> BTreeMap<ModPath, Vec<&String>> {
    let mut children: BTreeMap<ModPath, Vec<&String>> = BTreeMap::new();
    for module in tree.keys().filter(|m| !m.is_empty()) {
        children.entry(module[..module.len() - 1].to_vec()).or_default().push(&module[module.len() - 1]);
    }
    children
}

/// Per module, the names it re-exports with `pub use` and the module each comes from.
fn re_exports(tree: &BTreeMap<ModPath, Vec<Token>>) -> HashMap<ModPath, HashMap<String, ModPath>> {
    let none = HashMap::new();
    let mut exports: HashMap<ModPath, HashMap<String, ModPath>> = HashMap::new();
    for (module, tokens) in tree {
        for (at, token) in tokens.iter().enumerate() {
            let public = at > 0 && matches!(tokens[at - 1].text.as_str(), "pub" | ")");
            if token.text != "use" || !public {
                continue;
            }
            for leaf in use_tree(&tokens[at + 1..]) {
                if let Some(from) = resolve(tree, &none, module, &leaf.path) {
                    exports.entry(module.clone()).or_default().insert(leaf.alias, from);
                }
            }
        }
    }
    exports
}

/// The module `path`, used in `module`, names; `None` for other crates.
fn resolve(
    tree: &BTreeMap<ModPath, Vec<Token>>,
    exports: &HashMap<ModPath, HashMap<String, ModPath>>,
    module: &ModPath,
    path: &[String],
) -> Option<ModPath> {
    let child = |at: &ModPath, name: &String| {
        let mut child = at.clone();
        child.push(name.clone());
        tree.contains_key(&child).then_some(child)
    };
    let (mut at, mut rest) = match path.first()?.as_str() {
        "crate" => (ModPath::new(), &path[1..]),
        "self" => (module.clone(), &path[1..]),
        "super" => (module.clone(), path),
        // A bare name is a submodule of `module`, or another crate.
        _ => (child(module, &path[0])?, &path[1..]),
    };
    while rest.first().is_some_and(|s| s == "super") {
        at.pop();
        rest = &rest[1..];
    }
    for segment in rest {
        match child(&at, segment) {
            Some(deeper) => at = deeper,
            None => return Some(exports.get(&at).and_then(|e| e.get(segment)).cloned().unwrap_or(at)),
        }
    }
    Some(at)
}

// === paths in code ===

/// Every path to this crate's modules: each leaf of each `use` tree, and each
/// `crate::`/`super::` path elsewhere, with its line.
fn paths(tokens: &[Token]) -> Vec<(Vec<String>, usize)> {
    let mut found = Vec::new();
    let mut at = 0;
    while at < tokens.len() {
        let token = &tokens[at];
        let after_dollar = at > 0 && tokens[at - 1].text == "$";
        // `use<..>` in `impl Trait + use<..>` captures lifetimes: no import.
        if token.text == "use" && tokens.get(at + 1).is_some_and(|t| t.text != "<") {
            let end = tokens[at..].iter().position(|t| t.text == ";").map_or(tokens.len(), |p| at + p);
            found.extend(use_tree(&tokens[at + 1..end]).into_iter().map(|leaf| (leaf.path, leaf.line)));
            at = end;
        } else if (token.text == "crate" || token.text == "super") && !after_dollar {
            let mut path = vec![token.text.clone()];
            while tokens.get(at + 1).is_some_and(|t| t.text == "::")
                && let Some(next) = tokens.get(at + 2).filter(|t| is_ident(&t.text))
            {
                path.push(next.text.clone());
                at += 2;
            }
            found.push((path, token.line));
        }
        at += 1;
    }
    found
}

/// One imported path of a `use` tree.
struct Leaf {
    path: Vec<String>,
    /// The name it is imported under.
    alias: String,
    line: usize,
}

/// The leaves of the `use` tree starting at `tokens`.
fn use_tree(tokens: &[Token]) -> Vec<Leaf> {
    let mut leaves = Vec::new();
    tree_at(tokens, &mut 0, Vec::new(), &mut leaves);
    leaves
}

/// Reads one (sub)tree at `at`, below `prefix`, into `leaves`.
fn tree_at(tokens: &[Token], at: &mut usize, mut prefix: Vec<String>, leaves: &mut Vec<Leaf>) {
    while let Some(token) = tokens.get(*at) {
        *at += 1;
        match token.text.as_str() {
            "::" => {}
            "{" => {
                while tokens.get(*at).is_some_and(|t| t.text != "}") {
                    tree_at(tokens, at, prefix.clone(), leaves);
                    if tokens.get(*at).is_some_and(|t| t.text == ",") {
                        *at += 1;
                    }
                }
                *at += 1;
                return;
            }
            "*" => return leaves.push(Leaf { path: prefix, alias: "*".into(), line: token.line }),
            text if is_ident(text) => {
                if tokens.get(*at).is_some_and(|t| t.text == "::") {
                    prefix.push(text.to_string());
                    continue;
                }
                // `self` in a group names the module before it.
                if text != "self" {
                    prefix.push(text.to_string());
                }
                let mut alias = text.to_string();
                if tokens.get(*at).is_some_and(|t| t.text == "as") {
                    alias = tokens.get(*at + 1).map_or(alias, |t| t.text.clone());
                    *at += 2;
                }
                return leaves.push(Leaf { path: prefix, alias, line: token.line });
            }
            _ => return,
        }
    }
}

// === tokens ===

struct Token {
    text: String,
    line: usize,
}

fn is_ident(text: &str) -> bool {
    text.starts_with(|c: char| c.is_alphabetic() || c == '_')
}

/// The tokens of `file` that compile outside tests: no comments, no
/// literals, no `#[cfg(test)]` items.
fn code_tokens(file: &Path) -> Vec<Token> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    drop_test_items(tokenize(&text))
}

/// Identifiers, `::` and single punctuation; comments and the insides of
/// string and character literals are skipped.
fn tokenize(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let (mut tokens, mut line, mut at) = (Vec::new(), 1, 0);
    // Index just past `end`, from `from`; `escapes`: a `\` hides the next char.
    let skip_to = |from: usize, end: &str, escapes: bool, line: &mut usize| -> usize {
        let end: Vec<char> = end.chars().collect();
        let mut at = from;
        while at < chars.len() && !chars[at..].starts_with(&end) {
            if escapes && chars[at] == '\\' {
                *line += usize::from(chars.get(at + 1) == Some(&'\n'));
                at += 1;
            }
            *line += usize::from(chars.get(at) == Some(&'\n'));
            at += 1;
        }
        at + end.len()
    };
    while at < chars.len() {
        let c = chars[at];
        let next = chars.get(at + 1).copied();
        if c == '\n' {
            line += 1;
            at += 1;
        } else if c.is_whitespace() {
            at += 1;
        } else if c == '/' && next == Some('/') {
            // Stops before the newline, which counts the line.
            at = skip_to(at, "\n", false, &mut line) - 1;
        } else if c == '/' && next == Some('*') {
            at = skip_to(at + 2, "*/", false, &mut line);
        } else if c == '"' {
            at = skip_to(at + 1, "\"", true, &mut line);
        } else if let Some(hashes) = raw_string(&chars[at..]) {
            let end = format!("\"{}", "#".repeat(hashes));
            at = skip_to(at + hashes + 2, &end, false, &mut line);
        } else if c == '\'' && (next == Some('\\') || chars.get(at + 2) == Some(&'\'')) {
            at = skip_to(at + 1, "'", true, &mut line);
        } else if c.is_alphanumeric() || c == '_' {
            let len = chars[at..].iter().take_while(|c| c.is_alphanumeric() || **c == '_').count();
            tokens.push(Token { text: chars[at..at + len].iter().collect(), line });
            at += len;
        } else if c == ':' && next == Some(':') {
            tokens.push(Token { text: "::".into(), line });
            at += 2;
        } else {
            tokens.push(Token { text: c.to_string(), line });
            at += 1;
        }
    }
    tokens
}

/// The number of `#` of a raw string literal starting here (`r"`, `r#"`).
fn raw_string(chars: &[char]) -> Option<usize> {
    let hashes = chars.iter().skip(1).take_while(|c| **c == '#').count();
    (chars.first() == Some(&'r') && chars.get(1 + hashes) == Some(&'"')).then_some(hashes)
}

/// Removes each item marked `#[cfg(test)]`: up to its `;`, or its block.
fn drop_test_items(tokens: Vec<Token>) -> Vec<Token> {
    const CFG_TEST: [&str; 7] = ["#", "[", "cfg", "(", "test", ")", "]"];
    let mut test_only = vec![false; tokens.len()];
    let mut at = 0;
    while at < tokens.len() {
        let marked =
            tokens[at..].iter().zip(CFG_TEST).filter(|(t, s)| t.text == *s).count() == CFG_TEST.len();
        if !marked {
            at += 1;
            continue;
        }
        let start = at;
        let mut depth = 0usize;
        for (i, token) in tokens.iter().enumerate().skip(at + CFG_TEST.len()) {
            at = i + 1;
            match token.text.as_str() {
                "(" | "[" | "{" => depth += 1,
                ")" | "]" => depth = depth.saturating_sub(1),
                "}" if depth <= 1 => break,
                "}" => depth -= 1,
                ";" if depth == 0 => break,
                _ => {}
            }
        }
        test_only[start..at].fill(true);
    }
    tokens.into_iter().zip(test_only).filter_map(|(token, test)| (!test).then_some(token)).collect()
}
