//! The engine on its own thread, and the handle the API layer holds: submit
//! a request (getting its event channel), abort one, read the stats. The
//! thread ends when the handle is dropped, failing nothing silently: any
//! request still in flight sees its channel close.
//!
//! Events reach their requests through a postman: the engine hands it each
//! step's events at once, and it sends them on, inside the async runtime
//! when there is one (waking a task from there is cheap) or on a thread of
//! its own otherwise.

use super::core::{Engine, Outbox};
use super::request::{Event, Request};
use super::scheduler::SeqId;
use super::stats::EngineStats;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

enum Command {
    Add(SeqId, Box<Request>, UnboundedSender<Event>),
    Abort(SeqId),
    Shutdown,
}

pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    next_id: AtomicU64,
    stats: Arc<EngineStats>,
    thread: Option<JoinHandle<()>>,
}

impl EngineHandle {
    pub fn spawn(engine: Engine) -> Self {
        let (commands, rx) = mpsc::channel();
        let stats = engine.stats();
        let (mail, mailbox) = unbounded_channel();
        spawn_postman(mailbox);
        let thread = std::thread::Builder::new()
            .name("shardline-engine".into())
            .spawn(move || run(engine, rx, mail))
            .expect("spawning the engine thread");
        EngineHandle {
            commands,
            next_id: AtomicU64::new(0),
            stats,
            thread: Some(thread),
        }
    }

    /// Queues a request; its events arrive on the returned channel. Dropping
    /// the receiver aborts the request.
    pub fn submit(&self, request: Request) -> (SeqId, UnboundedReceiver<Event>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded_channel();
        if self.commands.send(Command::Add(id, Box::new(request), tx.clone())).is_err() {
            let _ = tx.send(Event::Failed("the engine has stopped".into()));
        }
        (id, rx)
    }

    pub fn abort(&self, id: SeqId) {
        let _ = self.commands.send(Command::Abort(id));
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The engine thread: block while idle, otherwise take every queued command
/// and run a step; then hand what it produced to the postman.
fn run(mut engine: Engine, commands: mpsc::Receiver<Command>, mail: UnboundedSender<Outbox>) {
    'serve: loop {
        let outbox = engine.take_outbox();
        if !outbox.is_empty() {
            let _ = mail.send(outbox);
        }
        if !engine.has_work() {
            match commands.recv() {
                Ok(command) => {
                    if !apply(&mut engine, command) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        loop {
            match commands.try_recv() {
                Ok(command) => {
                    if !apply(&mut engine, command) {
                        break 'serve;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => break 'serve,
            }
        }
        if let Err(e) = engine.step() {
            engine.fail_all(&format!("the model step failed: {e}"));
        }
    }
    engine.fail_all("the server is shutting down");
    let _ = mail.send(engine.take_outbox());
}

fn spawn_postman(mut mailbox: UnboundedReceiver<Outbox>) {
    let deliver = |outbox: Outbox| {
        for (events, event) in outbox {
            let _ = events.send(event);
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move {
                while let Some(outbox) = mailbox.recv().await {
                    deliver(outbox);
                }
            });
        }
        Err(_) => {
            std::thread::Builder::new()
                .name("shardline-postman".into())
                .spawn(move || {
                    while let Some(outbox) = mailbox.blocking_recv() {
                        deliver(outbox);
                    }
                })
                .expect("spawning the postman thread");
        }
    }
}

/// Applies one command; false means stop.
fn apply(engine: &mut Engine, command: Command) -> bool {
    match command {
        Command::Add(id, request, events) => engine.add(id, *request, events),
        Command::Abort(id) => engine.abort(id),
        Command::Shutdown => return false,
    }
    true
}
