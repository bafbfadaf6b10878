//! Checks of a spec against this host: the program a handler runs, who may run it, and
//! which CPUs there are.

use super::Credentials;

/// Where `program` resolves (a path, or a name looked up in PATH), if it can be executed.
pub fn find_program(program: &str) -> std::result::Result<std::path::PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let candidates: Vec<std::path::PathBuf> = if program.contains('/') {
        vec![program.into()]
    } else {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|dir| dir.join(program))
            .collect()
    };
    let mut found_not_executable = None;
    for path in candidates {
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {
                return Ok(path)
            }
            Ok(_) => found_not_executable = Some(path),
            Err(_) => {}
        }
    }
    Err(match found_not_executable {
        Some(path) => format!("{} is not an executable file: chmod +x it", path.display()),
        None if program.contains('/') => "no such file: check the path".to_string(),
        None => "not found in PATH: give its full path, or install it".to_string(),
    })
}

/// Whether a process with exactly these credentials (handlers keep no supplementary group)
/// may execute `path`: search permission on every directory on the way, execute permission
/// on the file, and for a script (`#!`) read permission on it and the same of its
/// interpreter (a virtualenv's `python3` may point into root's home, which the kernel then
/// refuses with EACCES at every start). Permission bits only (no ACLs); root passes.
pub fn executable_by(
    path: &std::path::Path,
    credentials: Credentials,
) -> std::result::Result<(), String> {
    executable_through_interpreters(path, credentials, 0)
}

/// The kernel follows at most this many interpreters (`BINPRM_MAX_RECURSION`).
const MAX_INTERPRETERS: u32 = 4;

fn executable_through_interpreters(
    path: &std::path::Path,
    credentials: Credentials,
    depth: u32,
) -> std::result::Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if credentials.uid == 0 {
        return Ok(());
    }
    let path = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let allowed = |meta: &std::fs::Metadata| {
        let mode = meta.mode();
        if meta.uid() == credentials.uid {
            mode & 0o100 != 0
        } else if meta.gid() == credentials.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        }
    };
    for dir in path.ancestors().skip(1) {
        let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if !allowed(&meta) {
            return Err(format!("no search permission on {}", dir.display()));
        }
    }
    let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !allowed(&meta) {
        return Err(format!("no execute permission on {}", path.display()));
    }
    let Some(interpreter) = interpreter_of(&path) else {
        return Ok(());
    };
    let readable = if meta.uid() == credentials.uid {
        meta.mode() & 0o400 != 0
    } else if meta.gid() == credentials.gid {
        meta.mode() & 0o040 != 0
    } else {
        meta.mode() & 0o004 != 0
    };
    if !readable {
        return Err(format!(
            "no read permission on {}, a script its interpreter must read",
            path.display()
        ));
    }
    if depth + 1 >= MAX_INTERPRETERS {
        return Err(format!("{}: too many interpreters", path.display()));
    }
    executable_through_interpreters(&interpreter, credentials, depth + 1)
        .map_err(|why| format!("its interpreter {}: {why}", interpreter.display()))
}

/// The interpreter a script names on its `#!` line, as the kernel reads it (the first 256
/// bytes of the file).
fn interpreter_of(path: &std::path::Path) -> Option<std::path::PathBuf> {
    use std::io::Read as _;
    let mut head = Vec::with_capacity(256);
    std::fs::File::open(path)
        .ok()?
        .take(256)
        .read_to_end(&mut head)
        .ok()?;
    let line = head.strip_prefix(b"#!")?;
    let line = line.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    line.split_whitespace().next().map(std::path::PathBuf::from)
}

/// CPUs this process may run on (its affinity mask).
pub fn usable_cpus() -> Vec<u32> {
    nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| {
            (0..nix::sched::CpuSet::count() as u32)
                .filter(|&cpu| set.is_set(cpu as usize).unwrap_or(false))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_may_use_some_cpu() {
        assert!(!usable_cpus().is_empty());
    }

    #[test]
    fn executable_by_walks_directories_and_mode_bits() {
        use std::os::unix::fs::PermissionsExt;
        let nobody = Credentials {
            uid: 65534,
            gid: 65534,
        };
        executable_by(std::path::Path::new("/bin/sh"), nobody).unwrap();
        let dir = std::env::temp_dir().join(format!("parsrv-exec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let program = dir.join("prog");
        std::fs::write(&program, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = executable_by(&program, nobody).unwrap_err();
        assert!(err.starts_with("no execute permission"), "{err}");
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        executable_by(&program, nobody).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = executable_by(&program, nobody).unwrap_err();
        assert!(err.starts_with("no search permission on"), "{err}");
        executable_by(&program, Credentials { uid: 0, gid: 0 }).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_scripts_interpreter_must_be_reachable_too() {
        use std::os::unix::fs::PermissionsExt;
        let nobody = Credentials {
            uid: 65534,
            gid: 65534,
        };
        let dir = std::env::temp_dir().join(format!("parsrv-interp-{}", std::process::id()));
        let hidden = dir.join("hidden");
        std::fs::create_dir_all(&hidden).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        // An interpreter where nobody may look (a venv's python3 in root's home).
        std::fs::copy("/bin/sh", hidden.join("sh")).unwrap();
        std::fs::set_permissions(&hidden, std::fs::Permissions::from_mode(0o700)).unwrap();
        let script = dir.join("server");
        std::fs::write(&script, format!("#!{}/sh -e\nexit 0\n", hidden.display())).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = executable_by(&script, nobody).unwrap_err();
        assert!(
            err.starts_with(&format!(
                "its interpreter {}/sh: no search permission on",
                hidden.display()
            )),
            "{err}"
        );
        // The same script with an interpreter everyone may run passes, unless nobody may
        // read the script itself.
        std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
        executable_by(&script, nobody).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o711)).unwrap();
        let err = executable_by(&script, nobody).unwrap_err();
        assert!(err.starts_with("no read permission on"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
