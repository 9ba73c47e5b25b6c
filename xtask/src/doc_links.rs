//! The relative links of the repository's Markdown (README.md, docs/, deploy/, fuzz/): each must
//! name a file or folder that exists inside the repository. A link that leaves it (the old
//! `../shared/SPEC.md`) is a 404 for everyone reading the repository on its own.

use std::path::{Component, Path, PathBuf};

use anyhow::Context;

/// Folders never searched for Markdown: build outputs and environments, not documentation.
const SKIPPED_DIRS: &[&str] = &["target", ".venv", ".git", "node_modules", "artifacts"];

/// Checks every Markdown file under `root`; the error lists each broken link as
/// `file: target (why)`.
pub fn check(root: &Path) -> anyhow::Result<String> {
    let mut files = Vec::new();
    markdown_files(root, &mut files)?;
    files.sort();
    let mut links = 0;
    let mut broken = Vec::new();
    for file in &files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        for target in relative_links(&text) {
            links += 1;
            if let Err(why) = resolve(root, file, &target) {
                let shown = file.strip_prefix(root).unwrap_or(file);
                broken.push(format!("{}: {target} ({why})", shown.display()));
            }
        }
    }
    if !broken.is_empty() {
        anyhow::bail!("broken relative links: {}", broken.join("; "));
    }
    Ok(format!(
        "{links} relative links in {} Markdown files resolve inside the repository",
        files.len()
    ))
}

fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name();
        let file_type = entry
            .file_type()
            .with_context(|| format!("reading the type of {}", path.display()))?;
        if file_type.is_dir() {
            if !SKIPPED_DIRS.iter().any(|s| name == *s) {
                markdown_files(&path, out)?;
            }
        } else if file_type.is_file() && path.extension().is_some_and(|e| e == "md") {
            out.push(path);
        }
    }
    Ok(())
}

/// The link targets of `text` that point into the repository: inline links `[text](target)`
/// and reference definitions `[label]: target`, outside code blocks and code spans, without
/// URLs (`scheme:`), pure anchors (`#...`) and absolute paths; the `#anchor` and title dropped.
pub fn relative_links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_fence = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let line = without_code_spans(line);
        let mut targets = Vec::new();
        if let Some(rest) = line.trim_start().strip_prefix('[')
            && let Some((_, target)) = rest.split_once("]: ")
        {
            targets.push(target.to_owned());
        }
        let mut rest = line.as_str();
        while let Some(start) = rest.find("](") {
            let after = &rest[start + 2..];
            let Some(end) = closing_paren(after) else {
                break;
            };
            targets.push(after[..end].to_owned());
            rest = &after[end..];
        }
        for target in targets {
            if let Some(target) = repository_target(&target) {
                out.push(target);
            }
        }
    }
    out
}

/// `line` with its inline code spans blanked (a link inside backticks is text, not a link).
fn without_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
            out.push(' ');
        } else {
            out.push(if in_code { ' ' } else { c });
        }
    }
    out
}

/// The index of the `)` that closes a link target starting at `text[0]` (targets may hold
/// balanced parentheses).
fn closing_paren(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return Some(i),
            ')' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// The path part of a link target that points into the repository, or `None` for a URL, an
/// anchor in the same file or an absolute path.
fn repository_target(raw: &str) -> Option<String> {
    let target = raw.trim().trim_start_matches('<');
    // A title after the target: `(file.md "title")`.
    let target = target.split_whitespace().next()?.trim_end_matches('>');
    let path = target.split('#').next().unwrap_or_default();
    let is_url = path
        .split_once(':')
        .is_some_and(|(scheme, _)| !scheme.is_empty() && !scheme.contains('/'));
    if path.is_empty() || is_url || path.starts_with('/') {
        return None;
    }
    Some(path.to_owned())
}

/// Whether `target`, linked from `file`, exists and stays inside `root`.
fn resolve(root: &Path, file: &Path, target: &str) -> Result<(), &'static str> {
    let base = file.parent().unwrap_or(root);
    let mut resolved = base.to_path_buf();
    for part in Path::new(target).components() {
        match part {
            Component::ParentDir => {
                if !resolved.pop() || !resolved.starts_with(root) {
                    return Err("leaves the repository");
                }
            }
            Component::Normal(p) => resolved.push(p),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err("absolute"),
        }
    }
    if !resolved.starts_with(root) {
        return Err("leaves the repository");
    }
    if !resolved.exists() {
        return Err("no such file");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_relative_links_and_skips_urls_anchors_and_code() {
        let text = "\
See [the contract](docs/contract.md#2-joining) and [docs/](docs/), [web](https://x.io/a.md),
[top](#quick-start), [mail](mailto:a@b.c), [abs](/etc/passwd), `[not](code.md)`.
[ref]: deploy/README.md
[titled](docs/design.md \"Design\") [paren](docs/a_(b).md)
```sh
[fenced](nowhere.md)
```
";
        assert_eq!(
            relative_links(text),
            vec![
                "docs/contract.md",
                "docs/",
                "deploy/README.md",
                "docs/design.md",
                "docs/a_(b).md"
            ]
        );
    }

    #[test]
    fn a_link_out_of_the_repository_or_to_nothing_is_broken() {
        let root = std::env::temp_dir().join(format!("xtask-doc-links-{}", std::process::id()));
        let docs = root.join("docs");
        std::fs::create_dir_all(&docs).expect("create docs");
        std::fs::write(root.join("README.md"), "").expect("write README");
        std::fs::write(docs.join("design.md"), "").expect("write design");
        let readme = root.join("README.md");
        let design = docs.join("design.md");
        assert_eq!(resolve(&root, &readme, "docs/design.md"), Ok(()));
        assert_eq!(resolve(&root, &design, "../README.md"), Ok(()));
        assert_eq!(resolve(&root, &readme, "docs/"), Ok(()));
        assert_eq!(
            resolve(&root, &readme, "../shared/SPEC.md"),
            Err("leaves the repository")
        );
        assert_eq!(
            resolve(&root, &readme, "docs/contract.md"),
            Err("no such file")
        );
        std::fs::write(
            root.join("README.md"),
            "[c](docs/contract.md) [d](docs/design.md)",
        )
        .expect("write README");
        let err = check(&root).expect_err("a broken link fails the check");
        assert!(
            format!("{err:#}").contains("README.md: docs/contract.md (no such file)"),
            "{err:#}"
        );
        std::fs::remove_dir_all(&root).ok();
    }
}
