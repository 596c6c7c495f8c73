//! VM templates: read-only snapshots kept in a template directory
//! (`ferry-ctl template`, `ferry-ctl templates`), from which `ferry-dest
//! --from-template NAME [--lazy]` starts clones. Lazy clones of one
//! template all read the one file, so its pages sit in the page cache once.

use std::path::{Path, PathBuf};

use ferry_engine::api::{self, ApiRequest};

/// Where templates live when no `--template-dir` is given.
pub const DEFAULT_DIR: &str = "/var/lib/ferry/templates";

/// A template file's extension.
pub const EXT: &str = "snap";

/// The template directory: `dir` if given, else `$FERRY_TEMPLATE_DIR`, else
/// [`DEFAULT_DIR`].
pub fn resolve_dir(dir: Option<&Path>) -> PathBuf {
    dir.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("FERRY_TEMPLATE_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// Refuses template names that are empty, hidden, contain `/` or `..`, or
/// control characters.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.contains('/')
        || name.contains("..")
        || name.starts_with('.')
        || name.chars().any(char::is_control)
    {
        return Err(format!(
            "invalid template name {name:?}: no '/', '..', leading '.' or control characters"
        ));
    }
    Ok(())
}

/// `DIR/NAME.snap`, after checking the name.
pub fn path_of(dir: &Path, name: &str) -> Result<PathBuf, String> {
    check_name(name)?;
    Ok(dir.join(format!("{name}.{EXT}")))
}

fn call(sock: &Path, req: &ApiRequest) -> Result<serde_json::Value, String> {
    api::call(sock, req).map_err(|e| format!("{}: {e}", sock.display()))
}

/// Makes template `name` in `dir` from the VM behind the API socket `sock`:
/// pauses it if it runs, snapshots it to a temporary file, makes that
/// read-only (0444) and links it into place (an existing template is never
/// replaced), then resumes the VM if it was running. Returns the API's
/// snapshot answer with the template's path.
pub fn create(sock: &Path, dir: &Path, name: &str) -> Result<serde_json::Value, String> {
    use std::os::unix::fs::PermissionsExt;
    let dest = path_of(dir, name)?;
    if dest.symlink_metadata().is_ok() {
        return Err(format!("template {name:?} exists: {}", dest.display()));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let dir = std::path::absolute(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let dest = dir.join(format!("{name}.{EXT}"));
    let tmp = dir.join(format!(".{name}.{EXT}.tmp{}", std::process::id()));
    let status = call(sock, &ApiRequest::Status)?;
    let was_running = status["run_state"] == "running";
    if !was_running && status["run_state"] != "paused" {
        return Err(format!(
            "the VM is {}: only a running or paused VM can become a template",
            status["run_state"]
        ));
    }
    if was_running {
        call(sock, &ApiRequest::Pause)?;
    }
    let written = call(sock, &ApiRequest::Snapshot { path: tmp.clone() }).and_then(|answer| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444))
            .and_then(|()| std::fs::hard_link(&tmp, &dest))
            .map_err(|e| format!("{}: {e}", dest.display()))?;
        Ok(answer)
    });
    let _ = std::fs::remove_file(&tmp);
    let resumed = if was_running {
        call(sock, &ApiRequest::Resume).map(|_| ())
    } else {
        Ok(())
    };
    let mut answer = written?;
    // The API wrote the temporary name; the template is at `dest`.
    answer["path"] = serde_json::json!(dest);
    resumed.map_err(|e| format!("template written, but the VM could not be resumed: {e}"))?;
    Ok(serde_json::json!({
        "template": name,
        "path": dest,
        "resumed": was_running,
        "snapshot": answer,
    }))
}

/// The templates in `dir`, by name: name, path, size (bytes) and mtime
/// (seconds since the epoch). A missing directory has none.
pub fn list(dir: &Path) -> Result<serde_json::Value, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(serde_json::json!([])),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(&format!(".{EXT}")))
        else {
            continue;
        };
        if check_name(name).is_err() {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        out.push(serde_json::json!({
            "name": name,
            "path": path,
            "size": meta.len(),
            "mtime": mtime,
        }));
    }
    out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Ok(serde_json::Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for bad in ["", "a/b", "..", "x..y", ".hidden", "a\nb"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["web", "db-1", "base_2026.12"] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
        assert_eq!(
            path_of(Path::new("/t"), "web").unwrap(),
            Path::new("/t/web.snap")
        );
    }

    #[test]
    fn dirs() {
        assert_eq!(resolve_dir(Some(Path::new("/x"))), Path::new("/x"));
    }
}
