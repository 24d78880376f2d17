fn main() {
    if std::process::id() == 1 {
        skiff_agent::vm_main();
    }
    eprintln!("usage: skiff-agent is the init (PID 1) of a skiff microVM and takes no arguments");
    std::process::exit(2);
}
