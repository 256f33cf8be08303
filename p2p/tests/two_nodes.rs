//! Two real libp2p services on loopback: gossip, direct messages, requests, compression
//! accounting, and garbage on the listening port.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::time::Duration;

use keel_p2p::peers::Limits;
use keel_p2p::{start, Channel, Config, Event, Multiaddr, NetworkHandle};
use libp2p::multiaddr::Protocol;
use tokio::sync::mpsc::Receiver;
use tokio::time::timeout;

fn config(seed: u8, persistent: Vec<Multiaddr>) -> Config {
    Config {
        chain_id: "p2p-test".into(),
        secret: [seed; 32],
        listen: "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
        persistent_peers: persistent,
        seeds: vec![],
        limits: Limits {
            max_peers: 10,
            target_peers: 5,
            inbound_per_sec: 10,
        },
        compression_threshold_bytes: 1024,
        queue_bytes: 64 << 20,
        store: None,
    }
}

async fn listen_addr(h: &NetworkHandle) -> Multiaddr {
    for _ in 0..100 {
        if let Some(a) = h.listen_addrs().first() {
            return a.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no listen address");
}

async fn next_matching(
    events: &mut Receiver<Event>,
    what: &str,
    mut f: impl FnMut(&Event) -> bool,
) -> Event {
    timeout(Duration::from_secs(15), async {
        loop {
            let e = events.recv().await.expect("events");
            if f(&e) {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn compressible(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 17) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_gossip_send_directly_and_answer_requests() {
    let (a, mut a_events) = start(config(1, vec![])).unwrap();
    let a_addr = listen_addr(&a).await;
    let a_full: Multiaddr = format!("{a_addr}/p2p/{}", a.local_peer_id())
        .parse()
        .unwrap();
    let (b, mut b_events) = start(config(2, vec![a_full])).unwrap();
    let a_id = a.local_peer_id();
    let b_id = b.local_peer_id();
    next_matching(
        &mut a_events,
        "b connects",
        |e| matches!(e, Event::Connected(p) if *p == b_id),
    )
    .await;
    next_matching(
        &mut b_events,
        "a connects",
        |e| matches!(e, Event::Connected(p) if *p == a_id),
    )
    .await;
    assert_eq!(a.peer_count(), 1);

    // Gossip: retried until the subscription is known; large, so compressed.
    let big = compressible(50_000);
    let got = timeout(Duration::from_secs(15), async {
        loop {
            b.publish(Channel::Consensus, big.clone()).unwrap();
            tokio::select! {
                e = a_events.recv() => {
                    if let Some(Event::Gossip { peer, channel, data, .. }) = e {
                        return (peer, channel, data);
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
        }
    })
    .await
    .expect("gossip arrives");
    assert_eq!(got, (b_id, Channel::Consensus, big.clone()));
    let stats = b.byte_stats();
    assert!(
        stats.sent_compressed > 0 && stats.sent_compressed < stats.sent_compressed_payload / 5,
        "50 kB of a repeating pattern went out compressed: {stats:?}"
    );
    assert!(a.byte_stats().received_compressed > 0);

    // Direct, small: not compressed.
    let before = a.byte_stats();
    a.send_direct(b_id, b"vote".to_vec()).unwrap();
    let e = next_matching(&mut b_events, "direct", |e| {
        matches!(e, Event::Direct { .. })
    })
    .await;
    let Event::Direct { peer, data } = e else {
        unreachable!()
    };
    assert_eq!((peer, data), (a_id, b"vote".to_vec()));
    let after = a.byte_stats();
    assert_eq!(
        after.sent_compressed, before.sent_compressed,
        "small payloads stay raw"
    );
    assert!(after.sent_raw > before.sent_raw);

    // Request / response.
    let b2 = b.clone();
    let asking = tokio::spawn(async move { b2.request(a_id, b"status?".to_vec()).await });
    let e = next_matching(&mut a_events, "request", |e| {
        matches!(e, Event::Request { .. })
    })
    .await;
    let Event::Request { peer, id, data } = e else {
        unreachable!()
    };
    assert_eq!((peer, data), (b_id, b"status?".to_vec()));
    a.respond(id, compressible(20_000)).unwrap();
    assert_eq!(asking.await.unwrap().unwrap(), compressible(20_000));

    // Garbage on the p2p port: the handshake fails, nothing else happens.
    let port = a_addr
        .iter()
        .find_map(|p| match p {
            Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .unwrap();
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0xffu8; 4096][..],
        &[0u8; 1][..],
    ] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = s.write_all(junk);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.send_direct(b_id, b"still here".to_vec()).unwrap();
    let e = next_matching(&mut b_events, "direct after garbage", |e| {
        matches!(e, Event::Direct { .. })
    })
    .await;
    assert!(matches!(e, Event::Direct { data, .. } if data == b"still here"));

    // An oversized message is refused before it is queued.
    assert!(a
        .publish(
            Channel::Transactions,
            vec![0; Channel::Transactions.max_message_bytes() + 1]
        )
        .is_err());
}
