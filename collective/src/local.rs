//! Links between ranks in one process: bounded channels standing in for network streams
//! (local benchmarks and tests).

use tokio::sync::mpsc::{Receiver, Sender, channel};

use crate::{Link, Piece};

/// One direction of an in-process link.
pub struct ChannelLink {
    tx: Option<Sender<Piece>>,
    rx: Option<Receiver<Piece>>,
}

impl Link for ChannelLink {
    async fn send(&mut self, piece: Piece) -> Result<(), String> {
        let tx = self.tx.as_ref().ok_or("this link only receives")?;
        tx.send(piece)
            .await
            .map_err(|_| "the receiving rank is gone".to_string())
    }

    async fn recv(&mut self) -> Result<Piece, String> {
        let rx = self.rx.as_mut().ok_or("this link only sends")?;
        rx.recv()
            .await
            .ok_or_else(|| "the peer closed the link".to_string())
    }
}

/// Links for a ring of `n` ranks in this process: element `r` is rank r's (link to rank r+1,
/// link from rank r-1). `depth` pieces may be in flight on each link.
pub fn ring(n: usize, depth: usize) -> Vec<(ChannelLink, ChannelLink)> {
    let (mut senders, mut receivers): (Vec<_>, Vec<_>) = (0..n)
        .map(|_| channel(depth.max(1)))
        .map(|(tx, rx)| (Some(tx), Some(rx)))
        .unzip();
    (0..n)
        .map(|r| {
            // Channel r carries rank r's output to rank r+1.
            let next = ChannelLink {
                tx: senders[r].take(),
                rx: None,
            };
            let prev = ChannelLink {
                tx: None,
                rx: receivers[(r + n - 1) % n].take(),
            };
            (next, prev)
        })
        .collect()
}

impl ChannelLink {
    /// A receiving-only link over `rx` (tests feeding a rank by hand).
    pub fn receiving(rx: Receiver<Piece>) -> Self {
        Self {
            tx: None,
            rx: Some(rx),
        }
    }
}

/// A sending-only link whose receiver is kept elsewhere (tests of a single rank).
pub fn sender(depth: usize) -> (ChannelLink, Receiver<Piece>) {
    let (tx, rx) = channel(depth.max(1));
    (
        ChannelLink {
            tx: Some(tx),
            rx: None,
        },
        rx,
    )
}
