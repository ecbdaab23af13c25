//! Entry point: read `.env`, parse the command line, set up logging and the
//! shutdown signal, and hand off to the command.

use clap::Parser;
use msys::{cli, shutdown, telemetry};

/// mimalloc instead of glibc's malloc: a batch is built on one worker thread and its answers
/// are freed on others, and glibc serialises such cross-thread frees on an arena lock (futex
/// waits were a tenth of the user role's CPU under GetUser load; with mimalloc a GetUser
/// costs ~11 µs of CPU instead of ~13.5). Built with `no_thp`: transparent huge pages
/// nearly doubled the idle RSS (22 MB against 12.5).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // A missing .env is normal; real environment variables win over it.
    let _ = dotenvy::dotenv();
    no_backtraces_in_errors();
    msys::memory::configure_allocators();
    // Parked workers hand freed memory back to the system (src/memory.rs).
    tokio::runtime::Builder::new_multi_thread()
        .on_thread_park(msys::memory::on_worker_park)
        .enable_all()
        .build()?
        .block_on(run())
}

/// Errors are routine here (a database restart fails thousands of calls), and
/// with RUST_BACKTRACE=1 in the environment anyhow captured a backtrace in
/// each and the log line symbolised it: that loaded the binary's debug info
/// once and for all, and the user role idled at ~115 MB after a database
/// restart instead of ~14 MB (tests/it/hardening.rs,
/// memory_after_a_database_restart_under_load_stays_bounded). Panics keep
/// RUST_BACKTRACE; RUST_LIB_BACKTRACE=1 brings error backtraces back.
fn no_backtraces_in_errors() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: called first thing in main, before the runtime or any other
        // thread exists, so nothing reads the environment concurrently.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    let telemetry = telemetry::init(cli.log_format, &cli.command.role());
    let result = cli::run(cli.command, shutdown::on_signal()).await;
    telemetry.shutdown();
    result
}
