//! The connection between the leader node and a follower
//! (`super::nodes`): the messages it carries, their encoding into the
//! codec's length-prefixed frames, and one end of it.

use super::codec::{read_frame, write_frame, Decoder, Encoder};
use super::WorkerOptions;
use crate::model::{ForwardBatch, StepOutput};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;

/// Messages between the leader and a follower.
#[derive(Debug)]
pub(super) enum Message {
    /// Follower → leader, first: who it is and what it would load.
    Hello {
        node: usize,
        fingerprint: u64,
    },
    /// Leader → follower: what to load, and the transport's group keys.
    Welcome {
        options: WorkerOptions,
        keys: Vec<Vec<u8>>,
    },
    Refuse(String),
    /// Follower → leader after loading (its decode weight bytes) and after
    /// joining (0), or why it could not.
    Ready(Result<u64, String>),
    /// Leader → follower: every node has loaded; join the groups.
    Start,
    Step(Arc<ForwardBatch>),
    /// Follower → leader: the reporting rank's output, or a rank's failure.
    Result(Result<StepOutput, String>),
}

/// One end of a leader–follower connection.
pub(super) struct Peer {
    pub node: usize,
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

impl Peer {
    pub fn new(node: usize, stream: TcpStream) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        Ok(Peer {
            node,
            reader: BufReader::new(stream.try_clone()?),
            writer: BufWriter::new(stream),
        })
    }

    pub fn send(&mut self, message: &Message) -> io::Result<()> {
        self.send_frame(&message.to_frame())
    }

    /// Sends a message already encoded, so one encoding serves every follower.
    pub fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        write_frame(&mut self.writer, frame)?;
        self.writer.flush()
    }

    pub fn recv(&mut self) -> io::Result<Message> {
        read_message(&mut self.reader)
    }

    /// A second handle on the connection, for a thread that only writes.
    pub fn try_clone(&self) -> io::Result<Self> {
        Peer::new(self.node, self.writer.get_ref().try_clone()?)
    }

    /// A second handle on the connection, for a thread that only reads.
    pub fn split_reader(&self) -> io::Result<BufReader<TcpStream>> {
        Ok(BufReader::new(self.reader.get_ref().try_clone()?))
    }

    /// Lets reads wait as long as they take (the hello had a time limit).
    pub fn clear_read_timeout(&self) -> io::Result<()> {
        self.reader.get_ref().set_read_timeout(None)
    }

    /// Ends the connection both ways, waking a thread blocked reading it.
    pub fn close(&self) {
        let _ = self.writer.get_ref().shutdown(Shutdown::Both);
    }

    /// Waits for a `Ready`; a hang-up or a failure becomes the error.
    pub fn await_ready(&mut self) -> Result<u64, String> {
        match self.recv() {
            Ok(Message::Ready(ready)) => ready.map_err(|why| format!("node {}: {why}", self.node)),
            Ok(other) => Err(format!("node {} sent {other:?} out of turn", self.node)),
            Err(e) => Err(format!("node {} hung up: {e}", self.node)),
        }
    }
}

pub(super) fn read_message(reader: &mut impl Read) -> io::Result<Message> {
    let frame = read_frame(reader)?;
    Message::decode(&mut Decoder::new(&frame)).map_err(|why| io::Error::new(io::ErrorKind::InvalidData, why))
}

impl Message {
    pub fn to_frame(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        self.encode(&mut e);
        e.bytes
    }

    fn encode(&self, e: &mut Encoder) {
        match self {
            Message::Hello { node, fingerprint } => {
                e.u8(0);
                e.usize(*node);
                e.u64(*fingerprint);
            }
            Message::Welcome { options, keys } => {
                e.u8(1);
                e.options(options);
                e.usize(keys.len());
                keys.iter().for_each(|k| e.bytes(k));
            }
            Message::Refuse(why) => {
                e.u8(2);
                e.str(why);
            }
            Message::Ready(ready) => {
                e.u8(3);
                e.result(ready, |e, v| e.u64(*v));
            }
            Message::Start => e.u8(4),
            Message::Step(batch) => {
                e.u8(5);
                e.batch(batch);
            }
            Message::Result(result) => {
                e.u8(6);
                e.result(result, Encoder::output);
            }
        }
    }

    fn decode(d: &mut Decoder) -> Result<Self, String> {
        let message = match d.u8()? {
            0 => Message::Hello {
                node: d.usize()?,
                fingerprint: d.u64()?,
            },
            1 => {
                let options = d.options()?;
                let keys = (0..d.usize()?).map(|_| d.bytes()).collect::<Result<_, _>>()?;
                Message::Welcome { options, keys }
            }
            2 => Message::Refuse(d.str()?),
            3 => Message::Ready(d.result(Decoder::u64)?),
            4 => Message::Start,
            5 => Message::Step(Arc::new(d.batch()?)),
            6 => Message::Result(d.result(Decoder::output)?),
            tag => return Err(format!("unknown message {tag}")),
        };
        d.finish()?;
        Ok(message)
    }
}
