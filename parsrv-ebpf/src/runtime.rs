//! What every eBPF object of parsrv carries besides its program: the panic handler a
//! `no_std` binary must have (never called: the verifier proves no path reaches it) and the
//! licence the kernel checks before it allows GPL-only helpers. Each object's root includes
//! this file (`mod runtime;`, or by `#[path]` from `bin/`).

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
