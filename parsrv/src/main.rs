fn main() {
    std::process::exit(parsrv::cli::main());
}
