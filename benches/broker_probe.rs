//! The broker's own figures, the reference `scripts/bench-pipeline.sh`
//! divides msys's figures by: records shaped like user events (a real
//! encoded `msys.user.created.v1`, headers included) on a scratch topic.
//!
//! `broker_probe throughput --brokers 127.0.0.1:9093 --records 50000`:
//! produces the records with the relay's producer (idempotent, acks=all,
//! linger 5 ms), then reads them back with one consumer; prints both rates.
//! `broker_probe latency --rate 200 --seconds 20`: produce -> consume
//! latency at a steady rate, with the order role's `fetch.wait.max.ms`.
//! It measures; it asserts nothing.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use msys::{config::KafkaArgs, events, pb};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
    message::{Header, Headers},
    producer::FutureRecord,
};

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Mode {
    Throughput,
    Latency,
}

#[derive(Parser, Debug)]
struct Args {
    #[arg(value_enum)]
    mode: Mode,
    #[arg(long, default_value = "127.0.0.1:9093")]
    brokers: String,
    #[arg(long, default_value_t = 50_000)]
    records: usize,
    #[arg(long, default_value_t = 200)]
    rate: u64,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// The consumer's fetch.wait.max.ms, as the order role sets it.
    #[arg(long, default_value_t = 50)]
    fetch_wait_ms: u64,
}

fn kafka(brokers: &str, topic: &str) -> anyhow::Result<KafkaArgs> {
    let (host, port) = brokers.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("--brokers is host:port"))?;
    Ok(KafkaArgs {
        kafka_host: host.to_owned(),
        kafka_port: port.parse()?,
        kafka_extra_brokers: String::new(),
        user_events_topic: topic.to_owned(),
        user_events_partitions: 3,
        user_events_replication_factor: 1,
        security: Default::default(),
    })
}

/// What the relay would send for the i-th user of a load run.
fn user_event(i: u64) -> pb::UserEvent {
    let now = SystemTime::now();
    pb::UserEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        r#type: events::EventType::Created.as_str().to_owned(),
        user: Some(pb::User {
            id: i as i64 + 1,
            name: format!("load {}", i % 32),
            email: format!("load-{}-{}-{i}@example.org", uuid::Uuid::new_v4().simple(), i % 32),
            version: 1,
            created_at: Some(now.into()),
            updated_at: Some(now.into()),
        }),
        occurred_at: Some(now.into()),
    }
}

fn consumer(kafka: &KafkaArgs, fetch_wait_ms: u64, offset: Offset) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("group.id", format!("probe-{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..3 {
        assignment.add_partition_offset(&kafka.user_events_topic, partition, offset)?;
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// Produces every record (with or without its headers) and waits for every
/// ack; returns the seconds that took and how many failed.
async fn produce_all(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    records: &[events::EncodedRecord],
    headers: bool,
) -> (f64, usize) {
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(records.len());
    for record in records {
        let mut future = FutureRecord::to(topic).key(&record.key).payload(&record.payload);
        if headers {
            future = future.headers(record.headers.clone());
        }
        loop {
            match producer.send_result(future) {
                Ok(delivery) => break deliveries.push(delivery),
                Err((_, back)) => {
                    future = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    let mut failed = 0;
    for delivery in deliveries {
        if !matches!(delivery.await, Ok(Ok(_))) {
            failed += 1;
        }
    }
    (started.elapsed().as_secs_f64(), failed)
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse_from(std::env::args().filter(|a| a != "--bench"));
    let topic = format!("probe-{}", uuid::Uuid::new_v4().simple());
    let kafka = kafka(&args.brokers, &topic)?;
    msys::kafka::ensure_topic(&kafka, &topic, 3, 1).await?;
    let producer = msys::kafka::producer(&kafka, "msys-probe", Duration::from_secs(30))?;
    match args.mode {
        Mode::Throughput => {
            let records: Vec<events::EncodedRecord> =
                (0..args.records as u64).map(|i| events::encode(&user_event(i))).collect();
            let bytes = records.iter().map(|r| r.key.len() + r.payload.len()).sum::<usize>() / records.len().max(1);
            let (produce, failed) = produce_all(&producer, &topic, &records, true).await;
            // The same records without their headers, on a second scratch topic: nisshi's cost
            // grows with each record's header count (see the README, "The event pipeline"),
            // which Apache Kafka's does not, so the pipeline's figures are read against both.
            let bare_topic = format!("{topic}-bare");
            msys::kafka::ensure_topic(&kafka, &bare_topic, 3, 1).await?;
            let (bare, _) = produce_all(&producer, &bare_topic, &records, false).await;
            let reader = consumer(&kafka, args.fetch_wait_ms, Offset::Beginning)?;
            let mut first = None;
            let mut read = 0;
            while read < args.records {
                tokio::time::timeout(Duration::from_secs(30), reader.recv()).await??;
                first.get_or_insert_with(Instant::now);
                read += 1;
            }
            let consume = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
            println!(
                "records={} failed={failed} record_bytes={bytes} headers={} produce_rps={:.0} consume_rps={:.0} \
                 produce_without_headers_rps={:.0}",
                args.records,
                records.first().map_or(0, |r| r.headers.count()),
                args.records as f64 / produce,
                args.records as f64 / consume.max(1e-9),
                args.records as f64 / bare,
            );
        }
        Mode::Latency => {
            let reader = consumer(&kafka, args.fetch_wait_ms, Offset::End)?;
            // Let the consumer reach the end of each partition first.
            let warm = Instant::now() + Duration::from_secs(3);
            while Instant::now() < warm {
                let _ = tokio::time::timeout(Duration::from_millis(200), reader.recv()).await;
            }
            let total = args.rate * args.seconds;
            let sender = {
                let (producer, topic) = (producer.clone(), topic.clone());
                let pace = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(pace);
                    for i in 0..total {
                        tick.tick().await;
                        let record = events::encode(&user_event(i));
                        let sent = now_ns().to_string();
                        let headers = record.headers.insert(Header { key: "probe_sent_ns", value: Some(&sent) });
                        let future =
                            FutureRecord::to(&topic).key(&record.key).payload(&record.payload).headers(headers);
                        if let Ok(delivery) = producer.send_result(future) {
                            drop(delivery);
                        }
                    }
                })
            };
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            for _ in 0..total {
                let message = tokio::time::timeout(Duration::from_secs(30), reader.recv()).await??;
                let sent = message
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "probe_sent_ns").and_then(|h| h.value))
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u128>().ok());
                if let Some(sent) = sent {
                    latency.saturating_record(((now_ns().saturating_sub(sent)) / 1000) as u64);
                }
            }
            sender.await?;
            println!(
                "records={} p50_ms={:.1} p99_ms={:.1} max_ms={:.1}",
                latency.len(),
                latency.value_at_quantile(0.5) as f64 / 1000.0,
                latency.value_at_quantile(0.99) as f64 / 1000.0,
                latency.max() as f64 / 1000.0,
            );
        }
    }
    Ok(())
}
