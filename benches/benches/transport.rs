//! Criterion microbenchmarks of every transport backend: one urgent 4 KiB read, and bulk streams of
//! 64 KiB runs (2 MiB for snapshot), reported as throughput. Raw limits beside them, in the same
//! run, come from `ferry-bench transport`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_benches::fixtures::{bulk_stream, filled_memory, urgent_page, Fixture, PAGE};
use ferry_transport::lane::PageBuf;
use ferry_transport::wire::{ReadReply, ReadRequest, ReadStatus, ZeroMask};
use ferry_transport::{Backing, PageRun};

use ferry_transport::tcp::Encryption;

const MEM: u64 = 64 << 20;
const STREAM: u64 = 16 << 20;

fn fixtures() -> Vec<(&'static str, Fixture, u32)> {
    let anon = filled_memory(MEM, Backing::Anonymous).expect("memory");
    let shared = filled_memory(MEM, Backing::Memfd).expect("memory");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("criterion-snapshot");
    vec![
        ("tcp", Fixture::tcp(anon.clone(), 32, Encryption::Off).expect("tcp fixture"), 16),
        ("tcp+tls", Fixture::tcp(anon.clone(), 32, Encryption::Tls).expect("tcp+tls fixture"), 16),
        ("local", Fixture::local(shared, 32).expect("local fixture"), 16),
        ("snapshot", Fixture::snapshot(&anon, &dir, 32).expect("snapshot fixture"), 512),
    ]
}

fn backends(c: &mut Criterion) {
    for (name, mut fx, run_pages) in fixtures() {
        let mut group = c.benchmark_group(name);
        let mut page = PageBuf::new(PAGE);
        let mut i = 0;
        let mut pool = Vec::new();
        group.throughput(Throughput::Bytes(PAGE as u64));
        group.bench_function("urgent_4k", |b| {
            b.iter(|| {
                i += 1;
                urgent_page(fx.source(), &mut page, i).expect("urgent read")
            })
        });
        group.throughput(Throughput::Bytes(STREAM));
        group.sample_size(20);
        group.bench_function(BenchmarkId::new("bulk_stream", run_pages as usize * PAGE), |b| {
            b.iter(|| bulk_stream(fx.source(), &mut pool, run_pages, STREAM).expect("bulk stream"))
        });
        group.finish();
    }
}

fn codec(c: &mut Criterion) {
    let req = ReadRequest { id: 7, run: PageRun::new(0, 12, 16) };
    let reply = ReadReply { id: 7, status: ReadStatus::Ok, pages: 16, zero: ZeroMask::default() };
    let mut prefix = Vec::new();
    reply.encode_prefix(4096, &mut prefix);
    c.bench_function("codec/read_request_round_trip", |b| {
        b.iter(|| ReadRequest::decode(&req.encode()).expect("decode"))
    });
    c.bench_function("codec/read_reply_prefix_decode", |b| {
        b.iter(|| ReadReply::decode_prefix(&prefix, &req, 4096).expect("decode"))
    });
}

criterion_group!(benches, backends, codec);
criterion_main!(benches);
