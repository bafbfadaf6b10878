//! Kernels to boot: Debian's packaged kernels, fetched with apt into target/vm without
//! installing them, or any bzImage by path.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use crate::{Fatal, EXIT_BAD_INPUT};

/// Debian kernel series the runner can fetch, and the suite each comes from. All three are
/// built with CONFIG_DEBUG_INFO_BTF, the bpf() system call and network namespaces.
pub const DEBIAN_SERIES: [(&str, &str); 3] = [
    // Older than parsrv's minimum (5.17): the tests must skip, naming the missing feature.
    ("5.10", "bullseye"),
    ("6.1", "bookworm"),
    ("6.12", "bookworm-backports"),
];

/// The suites the private apt configuration reads (security updates carry 6.1's newest).
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
";

pub enum KernelSpec {
    Debian { series: &'static str },
    Image(PathBuf),
}

/// A kernel image ready to boot.
#[derive(Clone)]
pub struct Kernel {
    /// What the user asked for: a Debian series or the path's file name.
    pub label: String,
    pub image: PathBuf,
    /// A Debian kernel's package, unpacked (`lib/modules/VERSION/` with depmod's index):
    /// the VM loads 9p from it at boot and autoloads the rest (veth, bridge, ...) from a
    /// share of it. None for a bzImage by path, which must have 9p built in.
    pub modules: Option<PathBuf>,
}

impl KernelSpec {
    /// A Debian series, or a path to an existing bzImage; anything else is bad input.
    pub fn parse(arg: &str) -> Result<KernelSpec> {
        if let Some((series, _)) = DEBIAN_SERIES.iter().find(|(series, _)| *series == arg) {
            return Ok(KernelSpec::Debian { series });
        }
        let path = PathBuf::from(arg);
        let known = DEBIAN_SERIES.map(|(s, _)| s).join(", ");
        if !path.exists() {
            return Err(Fatal::error(
                EXIT_BAD_INPUT,
                format!(
                    "--kernel {arg}: no such file, and not a Debian series parsrv fetches \
                     ({known}): pass a bzImage path or one of those"
                ),
            ));
        }
        check_bzimage(&path).map_err(|why| {
            Fatal::error(
                EXIT_BAD_INPUT,
                format!(
                    "--kernel {arg} is not an x86 Linux kernel image ({why}): pass a bzImage \
                     such as /boot/vmlinuz-*, or one of {known}"
                ),
            )
        })?;
        Ok(KernelSpec::Image(path))
    }

    /// Fetches (or takes from the cache) the kernel.
    pub fn resolve(&self, vm_dir: &Path) -> Result<Kernel> {
        match self {
            KernelSpec::Image(path) => Ok(Kernel {
                label: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| path.display().to_string()),
                image: path.clone(),
                modules: None,
            }),
            KernelSpec::Debian { series } => {
                let image = fetch_debian(series, vm_dir)?;
                Ok(Kernel {
                    label: (*series).to_owned(),
                    modules: Some(image.with_file_name("root")),
                    image,
                })
            }
        }
    }
}

/// Checks the x86 boot protocol's markers: 0xAA55 at 0x1FE and "HdrS" at 0x202.
fn check_bzimage(path: &Path) -> Result<(), String> {
    let mut header = [0u8; 0x206];
    let mut file = fs::File::open(path).map_err(|e| e.to_string())?;
    std::io::Read::read_exact(&mut file, &mut header)
        .map_err(|_| "shorter than a boot sector".to_owned())?;
    if header[0x1FE..0x200] != [0x55, 0xAA] || &header[0x202..0x206] != b"HdrS" {
        return Err("no boot sector signature and HdrS header".into());
    }
    Ok(())
}

/// The newest Debian kernel of `series`, cached in target/vm/kernels/SERIES/. Delete that
/// directory to fetch a newer one.
fn fetch_debian(series: &str, vm_dir: &Path) -> Result<PathBuf> {
    let cache = vm_dir.join("kernels").join(series);
    let image = cache.join("vmlinuz");
    // A cache from before the modules were kept is fetched again.
    if image.is_file() && cache.join("root/lib/modules").is_dir() {
        let package = fs::read_to_string(cache.join("package")).unwrap_or_default();
        eprintln!("xtask: kernel {series}: cached {}", package.trim());
        return Ok(image);
    }
    for tool in ["apt-get", "apt-cache", "dpkg-deb", "tar", "depmod"] {
        if Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            return Err(Fatal::error(
                EXIT_BAD_INPUT,
                format!(
                    "fetching Debian kernel {series} needs {tool} (a Debian or Ubuntu host): \
                     pass --kernel PATH to a bzImage instead"
                ),
            ));
        }
    }
    let apt = Apt::new(&vm_dir.join("apt"))?;
    apt.update()?;
    let (package, version) = apt.newest_image(series)?;
    eprintln!("xtask: kernel {series}: fetching {package} {version}");
    let downloads = vm_dir.join("apt/downloads");
    let _ = fs::remove_dir_all(&downloads);
    fs::create_dir_all(&downloads)?;
    crate::run_step(
        "fetching the kernel package",
        apt.command("apt-get")
            .args(["download", "-q"])
            .arg(format!("{package}={version}"))
            .current_dir(&downloads),
    )?;
    let deb = fs::read_dir(&downloads)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;

    // The whole package (the image and its modules), unpacked beside the cache, then
    // renamed into place, so an interrupted fetch leaves no half-written kernel.
    let staging = vm_dir.join("kernels").join(format!(".{series}.partial"));
    let _ = fs::remove_dir_all(&staging);
    let root = staging.join("root");
    fs::create_dir_all(&root)?;
    crate::run_step(
        "unpacking the kernel package",
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
    )?;
    let extracted = fs::read_dir(root.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("the package has no /boot/vmlinuz-*")?;
    fs::copy(&extracted, staging.join("vmlinuz"))?;
    // The package ships no modules.dep: depmod writes it (modprobe resolves from it).
    let version = module_version(&root)?;
    crate::run_step(
        "depmod (the kernel package's module index)",
        Command::new("depmod").arg("-b").arg(&root).arg(&version),
    )?;
    fs::write(staging.join("package"), format!("{package} {version}\n"))?;
    let _ = fs::remove_dir_all(&cache);
    fs::rename(&staging, &cache)?;
    fs::remove_dir_all(&downloads)?;
    Ok(image)
}

/// The one `lib/modules/VERSION` of an unpacked kernel package.
pub fn module_version(root: &Path) -> Result<String> {
    fs::read_dir(root.join("lib/modules"))
        .with_context(|| format!("{} has no lib/modules", root.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("{}/lib/modules is empty", root.display()))
}

/// apt with a private configuration under target/vm/apt: it reads the suites above and
/// touches neither the host's sources nor its package lists.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(dir: &Path) -> Result<Apt> {
        fs::create_dir_all(dir.join("lists/partial"))?;
        fs::create_dir_all(dir.join("cache/archives/partial"))?;
        fs::write(dir.join("sources.list"), SOURCES)?;
        Ok(Apt {
            dir: dir.to_owned(),
        })
    }

    fn command(&self, tool: &str) -> Command {
        let mut command = Command::new(tool);
        let option = |name: &str, value: &Path| format!("{name}={}", value.display());
        command
            .arg("-o")
            .arg(option(
                "Dir::Etc::SourceList",
                &self.dir.join("sources.list"),
            ))
            .args(["-o", "Dir::Etc::SourceParts=/nonexistent"])
            .arg("-o")
            .arg(option("Dir::State::Lists", &self.dir.join("lists")))
            .arg("-o")
            .arg(option("Dir::Cache", &self.dir.join("cache")))
            .args(["-o", "Debug::NoLocking=1"])
            .args(["-o", "Acquire::Languages=none"])
            // The host's _apt user may not enter target/: download as ourselves.
            .args(["-o", "APT::Sandbox::User=root"]);
        command
    }

    fn update(&self) -> Result<()> {
        crate::run_step(
            "apt-get update (private lists for the Debian kernels)",
            self.command("apt-get").args(["update", "-qq"]),
        )
    }

    /// The newest linux-image-amd64 of `series` and the versioned image package it
    /// depends on.
    fn newest_image(&self, series: &str) -> Result<(String, String)> {
        let madison = self
            .command("apt-cache")
            .args(["madison", "linux-image-amd64"])
            .output()?;
        let versions = String::from_utf8_lossy(&madison.stdout);
        // Lines: " linux-image-amd64 | 6.1.192-2 | http://... Packages", newest first.
        let version = versions
            .lines()
            .filter_map(|l| l.split('|').nth(1).map(str::trim))
            .find(|v| v.starts_with(&format!("{series}.")))
            .with_context(|| format!("no linux-image-amd64 {series}.* in the Debian archive"))?
            .to_owned();
        let show = self
            .command("apt-cache")
            .args(["show", &format!("linux-image-amd64={version}")])
            .output()?;
        let text = String::from_utf8_lossy(&show.stdout);
        let package = text
            .lines()
            .find_map(|l| l.strip_prefix("Depends: "))
            .and_then(|d| d.split([' ', ',']).next())
            .filter(|p| p.starts_with("linux-image-"))
            .with_context(|| format!("linux-image-amd64 {version} names no image package"))?
            .to_owned();
        Ok((package, version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_kernel_arguments_are_refused_with_the_fix() {
        let missing = KernelSpec::parse("/nonexistent/vmlinuz").err().unwrap();
        let missing = missing.downcast_ref::<Fatal>().unwrap();
        assert_eq!(missing.code, EXIT_BAD_INPUT);
        assert!(missing.message.contains("no such file"), "{missing}");
        assert!(missing.message.contains("5.10, 6.1, 6.12"), "{missing}");

        let not_a_kernel =
            std::env::temp_dir().join(format!("xtask-not-a-kernel-{}", std::process::id()));
        fs::write(&not_a_kernel, vec![0u8; 4096]).unwrap();
        let refused = KernelSpec::parse(not_a_kernel.to_str().unwrap())
            .err()
            .unwrap();
        let refused = refused.downcast_ref::<Fatal>().unwrap();
        assert_eq!(refused.code, EXIT_BAD_INPUT);
        assert!(
            refused.message.contains("not an x86 Linux kernel image"),
            "{refused}"
        );
        fs::write(&not_a_kernel, b"short").unwrap();
        assert!(KernelSpec::parse(not_a_kernel.to_str().unwrap()).is_err());

        let mut image = vec![0u8; 4096];
        image[0x1FE] = 0x55;
        image[0x1FF] = 0xAA;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        fs::write(&not_a_kernel, image).unwrap();
        assert!(matches!(
            KernelSpec::parse(not_a_kernel.to_str().unwrap()),
            Ok(KernelSpec::Image(_))
        ));
        fs::remove_file(&not_a_kernel).unwrap();
        assert!(matches!(
            KernelSpec::parse("6.12"),
            Ok(KernelSpec::Debian { series: "6.12" })
        ));
    }
}
