//! The admin API's server: axum's router served by hyper with the same client timeouts as
//! the data plane (`axum::serve` has none: an idle socket, or a head without its blank
//! line, stayed open for good). A request head must arrive within the head timeout of the
//! wait starting (idle keep-alive connections included); each next piece of a request
//! body within the body timeout (the handler's body read then fails, and hyper closes the
//! connection after the answer, since the body was not read to its end).
//!
//! The admin API is HTTP/1.1 only, as it was under `axum::serve` with axum's `http1`
//! feature.

use std::convert::Infallible;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tower_service::Service;

use super::ClientTimeouts;
use super::timed_body::TimedBody;

/// Serves `router` on `listener` until `shutdown` resolves; then stops accepting and lets
/// the requests in flight finish (the caller bounds how long it waits).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    timeouts: ClientTimeouts,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.head);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let body_timeout = timeouts.body;
        let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
            let request =
                request.map(|body| axum::body::Body::new(TimedBody::new(body, body_timeout)));
            let mut router = router.clone();
            // `Router` is always ready.
            async move { Ok::<_, Infallible>(router.call(request).await.unwrap_or_else(|e| match e {})) }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "admin connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
