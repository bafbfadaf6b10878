//! `--metrics ADDR:PORT`: an HTTP endpoint for monitoring, on hyper, every connection served
//! concurrently with bounded resources:
//!
//! - `GET /metrics`: Prometheus text exposition (version 0.0.4) of every group
//!   ([`render`](super::render));
//! - `GET /status`: the `parsrv status --json` array;
//! - `GET /healthz`: 200 while every group serves, 503 (with the reason) while one drains
//!   or has no live handler, for a load balancer's health check.
//!
//! At most [`MAX_CONNECTIONS`] connections are open at once, and at most
//! [`MAX_PER_CLIENT`] from one address (more are closed at accept); a connection must send
//! its request head within [`HEAD_TIMEOUT`], and an idle keep-alive connection is closed
//! after that as well: idle or slow clients cannot keep a scrape or a health check from
//! another address out.

use std::{
    cell::RefCell, collections::HashMap, convert::Infallible, net::IpAddr, rc::Rc, sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::status::GroupStatus;

/// Connections served at once; the ones above are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 1024;
/// Connections served at once from one client address: a client that holds this many
/// (slowly, or idle) cannot take the rest from Prometheus and the load balancer.
pub const MAX_PER_CLIENT: usize = 32;
/// How long a connection may take to send a request head (and may stay idle between two).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What an endpoint shows: the groups of a spawner, or a cluster agent's host.
pub trait Exposed {
    /// `/metrics`.
    fn metrics(&self) -> String;
    /// `/status`.
    fn json(&self) -> String;
    /// `/healthz`.
    fn health(&self) -> (StatusCode, String);
}

impl Exposed for Vec<GroupStatus> {
    fn metrics(&self) -> String {
        super::render(self)
    }

    fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain data") + "\n"
    }

    fn health(&self) -> (StatusCode, String) {
        health(self)
    }
}

/// Serves the endpoint until the task is dropped (inside a LocalSet: `statuses` reads the
/// spawner's state, which lives on its thread).
pub async fn serve<T: Exposed + 'static>(
    listener: TcpListener,
    statuses: impl Fn() -> T + 'static,
) {
    let statuses: Rc<dyn Fn() -> T> = Rc::new(statuses);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_client: Rc<RefCell<HashMap<IpAddr, usize>>> = Rc::default();
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            // EMFILE and the like: wait rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Dropping the stream closes it.
        let Some(client) = ClientSlot::take(&per_client, peer.ip()) else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let statuses = statuses.clone();
        tokio::task::spawn_local(async move {
            let service = hyper::service::service_fn(move |request| {
                let statuses = statuses.clone();
                async move { Ok::<_, Infallible>(answer(&request, &*statuses)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop((slot, client));
        });
    }
}

/// One of a client address's [`MAX_PER_CLIENT`] connections, given back when dropped.
struct ClientSlot {
    counts: Rc<RefCell<HashMap<IpAddr, usize>>>,
    client: IpAddr,
}

impl ClientSlot {
    fn take(counts: &Rc<RefCell<HashMap<IpAddr, usize>>>, client: IpAddr) -> Option<ClientSlot> {
        let mut all = counts.borrow_mut();
        let count = all.entry(client).or_default();
        if *count >= MAX_PER_CLIENT {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            counts: counts.clone(),
            client,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut all = self.counts.borrow_mut();
        if let Some(count) = all.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                all.remove(&self.client);
            }
        }
    }
}

fn answer<T: Exposed>(
    request: &Request<Incoming>,
    statuses: &dyn Fn() -> T,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    match request.uri().path() {
        "/metrics" | "/" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            statuses().metrics(),
        ),
        "/status" => reply(StatusCode::OK, "application/json", statuses().json()),
        "/healthz" => {
            let (status, why) = statuses().health();
            reply(status, "text/plain", why + "\n")
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /status or /healthz\n".into(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// 200 while every group serves; 503, naming the first group that does not, while one
/// drains or has no live handler, or when there is no group at all.
pub fn health(groups: &[GroupStatus]) -> (StatusCode, String) {
    if groups.is_empty() {
        return (StatusCode::SERVICE_UNAVAILABLE, "no group runs".into());
    }
    for group in groups {
        let name = &group.spec.name;
        if group.draining {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("group {name} is draining"),
            );
        }
        if !group.handlers.iter().any(|h| h.alive) {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("group {name} has no live handler"),
            );
        }
    }
    (
        StatusCode::OK,
        format!("ok: {} group(s) serve", groups.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_names_the_group_that_does_not_serve() {
        let serving = crate::status::tests::sample();
        assert_eq!(health(std::slice::from_ref(&serving)).0, StatusCode::OK);
        assert_eq!(health(&[]).0, StatusCode::SERVICE_UNAVAILABLE);
        let mut draining = serving.clone();
        draining.draining = true;
        let (code, why) = health(&[serving.clone(), draining]);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(why, "group web is draining");
        let mut dead = serving;
        dead.handlers.iter_mut().for_each(|h| h.alive = false);
        assert_eq!(health(&[dead]).1, "group web has no live handler");
    }
}
