//! The one HTTP accept loop every listener uses (the edge's webhook port, both admin
//! ports): HTTP/1.1 and h2c, a header-read timeout against slow clients, and graceful
//! shutdown (stop accepting, drain with a bound). Also the response helpers they share.

use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneService;

/// A boxed error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body every route answers with.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;
/// A route, boxed.
pub type HttpService = BoxCloneService<Request<Incoming>, Response<ResponseBody>, ServiceError>;

/// The error type of a route. Routes turn their errors into responses, so hyper only sees
/// one if a layer fails in a way nobody foresaw; a concrete type keeps the connection
/// future `Send` (hyper-util's `auto` connection is not, with a bare boxed error).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ServiceError(BoxError);

impl From<BoxError> for ServiceError {
    fn from(e: BoxError) -> Self {
        Self(e)
    }
}

/// The most a request head (request line and headers) may take.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Erases a response body's type.
pub fn boxed<B>(response: Response<B>) -> Response<ResponseBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    response.map(|b| b.map_err(Into::into).boxed_unsync())
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Serves `service` on `listener` until `shutdown`, then drains connections for at most
/// `grace`.
pub async fn serve(
    listener: TcpListener,
    service: HttpService,
    header_timeout: Duration,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        // Headers beyond 64 KiB get 431; Coinflow's are a few hundred bytes.
        .max_buf_size(MAX_HEAD_BYTES);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = builder.serve_connection(
                    TokioIo::new(stream),
                    TowerToHyperService::new(service.clone()),
                );
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = shutdown.cancelled() => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "shutdown grace elapsed with requests in flight");
        }
    }
}
