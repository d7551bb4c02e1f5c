//! The `tracing` events of the operator and its buffers, as a subscriber sees them: creation (the
//! shared buffer, the peer mapped, the rendezvous rounds), the path of every call (`trace`), why a
//! call was not fused (`debug`), a refusal and the poisoning it causes on its peer (`warn`).

use super::{call, test_config, UNFUSED};
use arfuse_fusion::{AllReduceRmsNorm, Path};
use arfuse_ipc::ThreadRendezvous;
use arfuse_kernels::api::Cpu;
use arfuse_kernels::{Backend, DType};
use arfuse_testkit::{run_threads_each, Fixture, Problem};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tracing::field::{Field, Visit};
use tracing::{span, Event, Level, Metadata, Subscriber};

/// One event as recorded: its level, message and other fields (as `Debug` text).
#[derive(Clone, Debug)]
struct Recorded {
    level: Level,
    message: String,
    fields: BTreeMap<String, String>,
    /// Names of the spans the event happened in, outermost first.
    spans: Vec<&'static str>,
}

/// A subscriber that records every event of its thread (installed with `with_default`).
#[derive(Clone, Default)]
struct Recorder {
    events: Arc<Mutex<Vec<Recorded>>>,
    spans: Arc<Mutex<BTreeMap<u64, &'static str>>>,
    entered: Arc<Mutex<Vec<u64>>>,
    next_id: Arc<AtomicU64>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().expect("a recorder lock (no panic while held)")
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attributes: &span::Attributes<'_>) -> span::Id {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&self.spans).insert(id, attributes.metadata().name());
        span::Id::from_u64(id)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        let message = fields.remove("message").unwrap_or_default();
        let spans = lock(&self.entered).iter().filter_map(|id| lock(&self.spans).get(id).copied()).collect();
        lock(&self.events).push(Recorded { level: *event.metadata().level(), message, fields, spans });
    }
    fn enter(&self, id: &span::Id) {
        lock(&self.entered).push(id.into_u64());
    }
    fn exit(&self, id: &span::Id) {
        let mut entered = lock(&self.entered);
        if let Some(at) = entered.iter().rposition(|&e| e == id.into_u64()) {
            entered.remove(at);
        }
    }
}

fn find<'a>(events: &'a [Recorded], message: &str) -> Vec<&'a Recorded> {
    events.iter().filter(|e| e.message == message).collect()
}

#[test]
fn creation_calls_fallbacks_and_refusals_are_traced() {
    let fixture = Fixture::<half::bf16>::generate(&Problem::new(2, 4, 256, DType::Bf16));
    let config = test_config(1 << 20);
    let per_rank = run_threads_each(ThreadRendezvous::group(2, Duration::from_secs(30)), |_, mut rendezvous| {
        let recorder = Recorder::default();
        tracing::subscriber::with_default(recorder.clone(), || {
            let device = Cpu::open_device(0, 1).expect("cpu device");
            let stream = Cpu::create_stream(&device).expect("cpu stream");
            let mut op = AllReduceRmsNorm::<Cpu>::new(&device, &mut rendezvous, config).expect("operator");
            assert_eq!(call(&mut op, &stream, None, &fixture).expect("dispatched").path, Path::OneStage);
            assert_eq!(call(&mut op, &stream, Some(UNFUSED), &fixture).expect("unfused").path, UNFUSED);
            // Rank 1 refuses its call (a hidden size of 100 is not a multiple of the pack); rank 0's
            // call pairs with that refusal and fails.
            let bad = Fixture::<half::bf16>::generate(&Problem::new(2, 1, 100, DType::Bf16));
            let theirs = if op.rank() == 1 { &bad } else { &fixture };
            assert!(call(&mut op, &stream, None, theirs).is_err());
        });
        let events = lock(&recorder.events).clone();
        events
    });
    for (rank, events) in per_rank.iter().enumerate() {
        let allocated = find(events, "shared buffer allocated");
        assert_eq!(allocated.len(), 1, "rank {rank}: {events:#?}");
        assert_eq!(allocated[0].level, Level::DEBUG);
        assert_eq!(allocated[0].spans, ["AllReduceRmsNorm::new"], "rank {rank}");
        let mapped = find(events, "mapped a peer's shared buffer");
        assert_eq!(mapped.len(), 1, "rank {rank}: one peer");
        assert_eq!(mapped[0].fields["peer"], (1 - rank).to_string());
        assert!(find(events, "rendezvous: all_gather round").iter().all(|e| e.level == Level::TRACE));
        assert!(find(events, "rendezvous: all_gather round").len() >= 2, "rank {rank}: two rounds of creation");
        assert_eq!(find(events, "operator created").len(), 1, "rank {rank}");

        let calls = find(events, "call");
        assert_eq!(calls[0].level, Level::TRACE);
        assert_eq!(calls[0].fields["path"], "fused-1stage");
        assert_eq!((calls[0].fields["rows"].as_str(), calls[0].fields["hidden"].as_str()), ("4", "256"));
        assert_eq!(calls[0].fields["forced"], "false");
        let unfused = find(events, "call not fused");
        assert_eq!(unfused.len(), 1, "rank {rank}: {events:#?}");
        assert_eq!(unfused[0].level, Level::DEBUG);
        assert_eq!(unfused[0].fields["reason"], "Disabled");
        assert_eq!(unfused[0].fields["forced"], "true");
    }
    let refused = find(&per_rank[1], "call refused; its peers are told");
    assert_eq!(refused.len(), 1, "{:#?}", per_rank[1]);
    assert!(refused[0].fields["error"].contains("multiple"), "{:?}", refused[0].fields);
    let poisoned = find(&per_rank[0], "operator poisoned: later calls are refused");
    assert_eq!(poisoned.len(), 1, "{:#?}", per_rank[0]);
    assert_eq!(poisoned[0].level, Level::WARN);
}

#[test]
fn the_dispatcher_says_why_a_call_was_not_fused() {
    let fixture = Fixture::<half::bf16>::generate(&Problem::new(1, 2, 256, DType::Bf16));
    let mut config = test_config(1 << 20);
    config.policy = config.policy.with_fusion_enabled(false);
    let mut rendezvous = ThreadRendezvous::group(1, Duration::from_secs(30)).remove(0);
    let recorder = Recorder::default();
    tracing::subscriber::with_default(recorder.clone(), || {
        let device = Cpu::open_device(0, 1).expect("cpu device");
        let stream = Cpu::create_stream(&device).expect("cpu stream");
        let mut op = AllReduceRmsNorm::<Cpu>::new(&device, &mut rendezvous, config).expect("operator");
        let ran = call(&mut op, &stream, None, &fixture).expect("call").path;
        assert!(matches!(ran, Path::Unfused { .. }), "{ran}");
    });
    let events = lock(&recorder.events).clone();
    let unfused = find(&events, "call not fused");
    assert_eq!(unfused.len(), 1, "{events:#?}");
    assert_eq!(unfused[0].fields["reason"], "Disabled");
    assert_eq!(unfused[0].fields["all_reduce"], "Custom");
    assert_eq!(unfused[0].fields["forced"], "false");
    assert_eq!(unfused[0].fields["path"], "unfused");
}
