//! `parsrv kernel`: the kernel features parsrv needs, whether this kernel has them, and what
//! the verifier makes of each program.

use crate::error::Result;

pub(super) fn kernel_features(json: bool) -> Result<()> {
    use crate::dataplane::verification::{self, thousands};
    use crate::features::{minimum_kernel, KernelFeatures};
    use crate::kernel::kernel_build;
    let probed = KernelFeatures::probe();
    let (programs, refused) = verification::report(|program| probed.require_for(&[program]));
    if json {
        #[derive(serde::Serialize)]
        struct Report<'a> {
            #[serde(flatten)]
            features: &'a KernelFeatures,
            /// `uname -r (uname -v)`.
            build: String,
            programs: &'a [verification::ProgramReport],
        }
        let report = Report {
            features: &probed,
            build: kernel_build(),
            programs: &programs,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("plain data")
        );
    } else {
        println!("kernel {}", kernel_build());
        println!("{:<36} {:>6}  {:<4} used for", "feature", "since", "here");
        for probe in &probed.features {
            println!(
                "{:<36} {:>6}  {:<4} {}",
                probe.name,
                probe.since.to_string(),
                if probe.present { "yes" } else { "NO" },
                probe.feature.used_for()
            );
        }
        println!(
            "verifier cost (parsrv keeps each program under {} insns processed):",
            thousands(verification::MARGIN_BUDGET)
        );
        for program in &programs {
            println!("  {:<22} {}", program.program, program.describe());
        }
    }
    if let Some(refusal) = refused {
        return Err(refusal);
    }
    probed.require_all().inspect(|()| {
        if !json {
            println!(
                "parsrv can run here (it needs Linux {} or newer)",
                minimum_kernel()
            );
        }
    })
}
