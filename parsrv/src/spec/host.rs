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
/// on the file. Permission bits only (no ACLs); root passes.
pub fn executable_by(
    path: &std::path::Path,
    credentials: Credentials,
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
    Ok(())
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
}
