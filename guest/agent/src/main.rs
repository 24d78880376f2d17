fn main() {
    // First: a waiter is never PID 1, but nothing else may run in one.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|flag| flag == skiff_agent::WAITER_FLAG)
    {
        skiff_agent::waiter_main();
    }
    if std::process::id() == 1 {
        skiff_agent::vm_main();
    }
    eprintln!("usage: skiff-agent is the init (PID 1) of a skiff microVM and takes no arguments");
    std::process::exit(2);
}
