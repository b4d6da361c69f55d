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
