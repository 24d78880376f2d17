//! Pausing and resuming a running VM's vCPUs, with tiny guests that count in
//! guest memory: a paused guest's counter must not move, a resumed one's must.

mod common;

use std::time::{Duration, Instant};

use common::counting::{all_advance, counters, counting_guest, timer_guest, watchdog, Watchdog};
use common::{asm, code_vm, Console};
use skiff::vmm::{NotRunning, RunningVm, Vm, VmConfig, VmExit};

/// How long a paused counter is watched for movement.
const STILL: Duration = Duration::from_millis(200);

/// Pauses the VM and checks that no counter moves; returns how long the
/// pause took.
fn pause_holds(vm: &RunningVm, vcpus: u8, still: Duration) -> Duration {
    let started = Instant::now();
    vm.pause_handle().pause().unwrap();
    let took = started.elapsed();
    assert!(vm.pause_handle().is_paused());
    let before = counters(vm, vcpus);
    std::thread::sleep(still);
    assert_eq!(counters(vm, vcpus), before, "a paused guest ran");
    took
}

fn start(config: VmConfig) -> (RunningVm, Watchdog) {
    let running = Vm::create(config).unwrap().start().unwrap();
    let dog = watchdog(running.stop_handle());
    (running, dog)
}

/// Stops the VM and checks that it ends as stopped.
fn stop(running: RunningVm) {
    running.stop_handle().stop();
    assert_eq!(running.wait().unwrap(), VmExit::Stopped);
}

#[test]
fn a_paused_guest_stays_put_until_resumed() {
    let console = Console::default();
    let mut config = code_vm(counting_guest(), &console);
    config.vcpus = 2;
    let (running, _dog) = start(config);
    assert!(all_advance(&running, &[0, 0]), "the guest never counted");

    let took = pause_holds(&running, 2, STILL);
    println!("pause of 2 busy vCPUs took {took:?}");
    // Pausing again is harmless and changes nothing.
    pause_holds(&running, 2, Duration::from_millis(50));

    let paused_at = counters(&running, 2);
    running.pause_handle().resume().unwrap();
    assert!(!running.pause_handle().is_paused());
    assert!(
        all_advance(&running, &paused_at),
        "the resumed guest did not count"
    );
    // Resuming a running VM is harmless.
    running.pause_handle().resume().unwrap();
    let now = counters(&running, 2);
    assert!(all_advance(&running, &now), "the guest stopped counting");

    stop(running);
}

#[test]
fn repeated_pauses_all_hold_and_the_guest_goes_on() {
    let console = Console::default();
    let mut config = code_vm(counting_guest(), &console);
    config.vcpus = 2;
    let (running, _dog) = start(config);
    assert!(all_advance(&running, &[0, 0]), "the guest never counted");

    let mut took = Vec::new();
    for _ in 0..50 {
        took.push(pause_holds(&running, 2, Duration::from_millis(10)));
        let paused_at = counters(&running, 2);
        running.pause_handle().resume().unwrap();
        assert!(
            all_advance(&running, &paused_at),
            "the resumed guest did not count"
        );
    }
    took.sort();
    println!(
        "pause of 2 busy vCPUs, 50 times: min {:?}, median {:?}, max {:?}",
        took[0],
        took[took.len() / 2],
        took[took.len() - 1]
    );
    stop(running);
}

#[test]
fn a_pause_right_after_start_holds() {
    let console = Console::default();
    let mut config = code_vm(counting_guest(), &console);
    config.vcpus = 2;
    // The vCPU threads may not even have reached their run loops yet.
    let (running, _dog) = start(config);
    pause_holds(&running, 2, STILL);
    let paused_at = counters(&running, 2);
    running.pause_handle().resume().unwrap();
    assert!(
        all_advance(&running, &paused_at),
        "the resumed guest did not count"
    );
    stop(running);
}

#[test]
fn stop_while_paused_ends_the_vm() {
    let console = Console::default();
    let mut config = code_vm(counting_guest(), &console);
    config.vcpus = 2;
    let (running, _dog) = start(config);
    assert!(all_advance(&running, &[0, 0]), "the guest never counted");
    let pause = running.pause_handle();
    pause_holds(&running, 2, Duration::from_millis(50));
    stop(running);
    // Nothing is left to pause or resume.
    assert_eq!(pause.pause(), Err(NotRunning));
    assert_eq!(pause.resume(), Err(NotRunning));
}

#[test]
fn a_guest_that_ended_cannot_be_paused() {
    let console = Console::default();
    let mut code = asm::I8042_RESET.to_vec();
    code.extend(asm::PARK);
    let (running, _dog) = start(code_vm(code, &console));
    let pause = running.pause_handle();
    assert_eq!(running.wait().unwrap(), VmExit::GuestReset);
    assert_eq!(pause.pause(), Err(NotRunning));
    assert!(!pause.is_paused());
}

#[test]
fn a_halted_guest_is_paused_and_its_timer_waits() {
    let console = Console::default();
    let (running, _dog) = start(code_vm(timer_guest(), &console));
    assert!(
        all_advance(&running, &[0]),
        "no timer interrupt reached the guest"
    );

    // The vCPU sleeps in KVM_RUN between interrupts; the kick must get it out.
    let took = pause_holds(&running, 1, STILL);
    println!("pause of 1 halted vCPU took {took:?}");

    let paused_at = counters(&running, 1);
    running.pause_handle().resume().unwrap();
    assert!(all_advance(&running, &paused_at), "the timer did not resume");
    stop(running);
}
