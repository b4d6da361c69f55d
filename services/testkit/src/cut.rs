//! A TCP forwarder that a test can cut: everything through it is closed at
//! once and new connections are refused until it is restored. Put in front
//! of Postgres, it cuts one edge instance off from the store while the
//! others keep theirs.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct CuttableLink {
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
    _task: tokio::task::JoinHandle<()>,
}

impl CuttableLink {
    /// Forwards a port-0 listener on loopback to `target`.
    pub async fn start(target: SocketAddr) -> CuttableLink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cut_seen) = watch::channel(false);
        let cut_seen = Arc::new(cut_seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut cut_seen = (*cut_seen).clone();
                if *cut_seen.borrow() {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut inbound, mut outbound) = (inbound, outbound);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_seen.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        CuttableLink {
            addr,
            cut,
            _task: task,
        }
    }

    /// Closes every forwarded connection and refuses new ones.
    pub fn cut(&self) {
        let _ = self.cut.send(true);
    }

    /// Forwards again.
    pub fn restore(&self) {
        let _ = self.cut.send(false);
    }
}

/// `url` (postgres://…@host:port/…) with its host and port replaced by
/// `addr`.
pub fn through(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let userinfo = authority
        .rsplit_once('@')
        .map(|(user, _)| format!("{user}@"));
    format!("{scheme}://{}{addr}/{path}", userinfo.unwrap_or_default())
}

/// Where `url` (postgres://…@host:port/…) points.
pub fn target_of(url: &str) -> SocketAddr {
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split('/').next().unwrap();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    let host_port = host_port.replace("localhost", "127.0.0.1");
    host_port.parse().unwrap()
}

/// A UDP forwarder that a test opens and closes: closed, it takes every
/// datagram and answers none (a network that blocks UDP); open, it relays
/// each sender's datagrams to `target` and the answers back.
pub struct UdpGate {
    pub addr: SocketAddr,
    open: watch::Sender<bool>,
    _task: tokio::task::JoinHandle<()>,
}

impl UdpGate {
    /// A closed gate on a port-0 loopback socket in front of `target`.
    pub async fn start(target: SocketAddr) -> UdpGate {
        use std::collections::HashMap;
        use tokio::net::UdpSocket;
        let public = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = public.local_addr().unwrap();
        let (open, open_seen) = watch::channel(false);
        let task = tokio::spawn(async move {
            // One socket towards the target per sender, so the target
            // tells the senders apart as it would without the gate.
            let mut towards: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buffer = vec![0u8; 65_536];
            loop {
                let Ok((length, sender)) = public.recv_from(&mut buffer).await else {
                    return;
                };
                if !*open_seen.borrow() {
                    continue;
                }
                let socket = match towards.get(&sender) {
                    Some(socket) => socket.clone(),
                    None => {
                        let Ok(socket) = UdpSocket::bind("127.0.0.1:0").await else {
                            continue;
                        };
                        if socket.connect(target).await.is_err() {
                            continue;
                        }
                        let socket = Arc::new(socket);
                        towards.insert(sender, socket.clone());
                        let (back, public, open_seen) =
                            (socket.clone(), public.clone(), open_seen.clone());
                        tokio::spawn(async move {
                            let mut buffer = vec![0u8; 65_536];
                            while let Ok(length) = back.recv(&mut buffer).await {
                                if *open_seen.borrow() {
                                    let _ = public.send_to(&buffer[..length], sender).await;
                                }
                            }
                        });
                        socket
                    }
                };
                let _ = socket.send(&buffer[..length]).await;
            }
        });
        UdpGate {
            addr,
            open,
            _task: task,
        }
    }

    /// Relays from now on.
    pub fn open(&self) {
        let _ = self.open.send(true);
    }

    /// Drops everything from now on.
    pub fn close(&self) {
        let _ = self.open.send(false);
    }
}
