//! Load generator for the user service, used by `scripts/bench.sh`:
//! `cargo bench --bench user_load -- create --addr http://127.0.0.1:50051 --concurrency 32 --seconds 10`
//! keeps `concurrency` requests in flight for `seconds` and prints one line
//! of figures. It measures; it asserts nothing.

use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use msys::pb::{self, user_service_client::UserServiceClient};
use tonic::transport::{Channel, Endpoint};

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Workload {
    /// CreateUser with a unique email per request.
    Create,
    /// GetUser of id 1..=--max-id.
    Get,
}

#[derive(Parser, Debug)]
struct Args {
    #[arg(value_enum, default_value = "create")]
    workload: Workload,
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Requests in flight at any moment.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// HTTP/2 connections the streams are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 1)]
    max_id: i64,
    /// Total requests per second, spread over the streams; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` appends --bench; it is not ours.
    let args = Args::parse_from(std::env::args().filter(|a| a != "--bench"));
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(Endpoint::from_shared(args.addr.clone())?.connect().await?);
    }
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..args.concurrency {
        let channel = channels[worker % channels.len()].clone();
        let pace = (args.rate > 0).then(|| Duration::from_secs_f64(args.concurrency as f64 / args.rate as f64));
        let job = Job { workload: args.workload, worker, run_id: run_id.clone(), max_id: args.max_id, deadline, pace };
        workers.push(tokio::spawn(work(channel, job)));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut ok, mut errors) = (0u64, 0u64);
    for worker in workers {
        let (histogram, worker_ok, worker_errors) = worker.await?;
        latency.add(histogram)?;
        ok += worker_ok;
        errors += worker_errors;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "requests={ok} errors={errors} seconds={seconds:.2} rps={:.1} p50_ms={:.2} p99_ms={:.2}",
        ok as f64 / seconds,
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0,
    );
    Ok(())
}

/// What one stream does.
struct Job {
    workload: Workload,
    worker: usize,
    run_id: String,
    max_id: i64,
    deadline: Instant,
    /// Time between two requests of this stream, if paced.
    pace: Option<Duration>,
}

/// One stream: requests back to back (or paced) until the deadline.
async fn work(channel: Channel, job: Job) -> (Histogram<u64>, u64, u64) {
    let Job { workload, worker, run_id, max_id, deadline, pace } = job;
    let mut ticker = pace.map(|p| {
        let mut ticker = tokio::time::interval(p);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    });
    let mut client = UserServiceClient::new(channel);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("constant bounds");
    let (mut ok, mut errors) = (0, 0);
    let mut i: u64 = 0;
    while Instant::now() < deadline {
        if let Some(ticker) = ticker.as_mut() {
            ticker.tick().await;
        }
        i += 1;
        let started = Instant::now();
        let result = match workload {
            Workload::Create => client
                .create_user(pb::CreateUserRequest {
                    name: format!("load {worker}"),
                    email: format!("load-{run_id}-{worker}-{i}@example.org"),
                })
                .await
                .map(drop),
            Workload::Get => {
                let id = (i as i64 % max_id.max(1)) + 1;
                client.get_user(pb::GetUserRequest { id }).await.map(drop)
            }
        };
        latency.saturating_record(started.elapsed().as_micros() as u64);
        match result {
            Ok(()) => ok += 1,
            Err(status) => {
                errors += 1;
                if errors == 1 {
                    eprintln!("worker {worker}: first error: {status:?}");
                }
            }
        }
    }
    (latency, ok, errors)
}
