//! A plain HTTP/1.1 client over real sockets.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// An answer: status, headers and the body.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body as JSON (`Null` when it isn't).
    pub json: serde_json::Value,
    /// The body as text.
    pub text: String,
}

/// An HTTP client.
#[derive(Clone)]
pub struct Http(Client<HttpConnector, Full<Bytes>>);

impl Default for Http {
    fn default() -> Self {
        Self(Client::builder(TokioExecutor::new()).build_http())
    }
}

impl Http {
    /// Sends a request.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = self
            .0
            .request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            json: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    /// POSTs a JSON body with extra headers.
    pub async fn post(&self, url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Answer {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(headers);
        self.send(Method::POST, url, &all, body).await
    }

    /// POSTs `body` signed with the test key, now.
    pub async fn deliver(&self, url: &str, body: Vec<u8>) -> Answer {
        let sig = crate::bodies::sign(&body);
        self.post(url, &[("coinflow-signature", &sig)], body).await
    }

    /// GETs a URL.
    pub async fn get(&self, url: &str) -> Answer {
        self.send(Method::GET, url, &[], Vec::new()).await
    }
}
