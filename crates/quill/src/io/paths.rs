//! Paths read from files, resolved inside the folder that holds them.

/// `dir/name` for a file name read from a file in `dir` (a shard index, a meta.json): a
/// relative path without `..`, that stays inside `dir` once links are followed, and names a
/// regular file (not a FIFO or a device). Anything else is refused, naming `what` declared it.
pub fn file_inside(
    dir: &std::path::Path,
    name: &str,
    what: &str,
) -> crate::Result<std::path::PathBuf> {
    use std::path::{Component, Path};
    let bad =
        |why: &str| crate::Error::Input(format!("{}: {what} names {name:?}, {why}", dir.display()));
    let rel = Path::new(name);
    if name.is_empty()
        || !rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(bad("which is not a file name inside the folder"));
    }
    let path = dir.join(rel);
    let real = path
        .canonicalize()
        .map_err(|e| crate::Error::io(&path, e))?;
    let home = dir.canonicalize().map_err(|e| crate::Error::io(dir, e))?;
    if !real.starts_with(&home) {
        return Err(bad("which leads outside the folder"));
    }
    let meta = std::fs::metadata(&real).map_err(|e| crate::Error::io(&real, e))?;
    if !meta.is_file() {
        return Err(bad("which is not a regular file"));
    }
    Ok(path)
}
