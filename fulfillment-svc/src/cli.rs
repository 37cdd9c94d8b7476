//! The operator CLI: subcommands of the `fulfillment-svc` binary that call a running
//! service's gRPC API (review queue, payments, entitlements). Output is plain text for
//! people, or with `--json` one JSON document on stdout for scripts (the views in
//! [`json`]). Errors go to stderr, with a non-zero exit.
#![allow(clippy::print_stdout)]

pub mod json;

use std::io::Write;

use coinflow_shared::proto::v1::fulfillment_client::FulfillmentClient;
use coinflow_shared::proto::v1::resolve_held_request::{Approve, Reject, Resolution};
use coinflow_shared::proto::v1::{
    self as pb, GetEntitlementsRequest, GetPaymentRequest, LedgerEntry, ListHeldRequest,
    ResolveHeldRequest,
};
use secrecy::{ExposeSecret, SecretString};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// Where the CLI connects.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The fulfillment-svc gRPC endpoint.
    #[arg(
        long,
        env = "FULFILLMENT_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,
    /// A bearer token: a query token (FULFILLMENT_API_TOKENS) for `payment` and
    /// `entitlements`, an operator token (FULFILLMENT_OPERATOR_TOKENS) for `held`, a
    /// recovery token (FULFILLMENT_RECOVERY_TOKENS) for `recover`.
    #[arg(long, env = "FULFILLMENT_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<SecretString>,
}

/// How a command prints what it got.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct Output {
    /// Print one JSON document on stdout instead of text: stable field names, numbers as
    /// numbers, amounts as integer cents, times as RFC 3339.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Review-queue commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum HeldCommand {
    /// List held payments, oldest first.
    List,
    /// Grant a held payment as if it had matched.
    Approve {
        /// The payment id.
        payment_id: String,
        /// Optional: the ledger records the operator the token names; a different name
        /// here is refused.
        #[arg(long, default_value = "")]
        operator: String,
        /// Why.
        #[arg(long, default_value = "")]
        note: String,
        /// The catalog entry to grant, when webhookInfo names none.
        #[arg(long)]
        item: Option<String>,
    },
    /// Close a held payment with no grant.
    Reject {
        /// The payment id.
        payment_id: String,
        /// Optional: the ledger records the operator the token names; a different name
        /// here is refused.
        #[arg(long, default_value = "")]
        operator: String,
        /// Why.
        #[arg(long, default_value = "")]
        note: String,
    },
}

/// Why a CLI command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The endpoint is malformed or unreachable.
    #[error("connecting to {0}: {1}")]
    Connect(String, tonic::transport::Error),
    /// The service refused the call.
    #[error("{}: {}", .0.code(), .0.message())]
    Call(#[from] Status),
    /// Writing the output failed (stdout closed, say).
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
    /// Rendering the JSON output failed.
    #[error("rendering the JSON output: {0}")]
    Json(#[from] serde_json::Error),
}

/// Prints `view` as one JSON document on stdout.
fn emit(view: &impl serde::Serialize) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, view)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// Adds the target's bearer token (if any) to every call.
#[derive(Clone)]
pub(crate) struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

type Client = FulfillmentClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

async fn connect(target: &Target) -> Result<Client, CliError> {
    let (channel, bearer) = channel(target).await?;
    Ok(FulfillmentClient::with_interceptor(channel, bearer))
}

/// A channel to the target and the interceptor that authenticates its calls.
pub(crate) async fn channel(target: &Target) -> Result<(Channel, Bearer), CliError> {
    let channel = Endpoint::from_shared(target.server.clone())
        .map_err(|e| CliError::Connect(target.server.clone(), e))?
        .connect()
        .await
        .map_err(|e| CliError::Connect(target.server.clone(), e))?;
    let bearer = target.token.as_ref().and_then(|t| {
        let mut v = MetadataValue::try_from(format!("Bearer {}", t.expose_secret())).ok()?;
        v.set_sensitive(true);
        Some(v)
    });
    Ok((channel, Bearer(bearer)))
}

fn show_entry(e: &LedgerEntry) {
    println!(
        "  #{:<6} {:<8} {:>+8} {:<16} payment={} actor={} item={} catalog={}{}",
        e.seq,
        e.kind,
        e.quantity,
        e.sku,
        e.payment_id,
        e.actor,
        e.item,
        e.catalog_version,
        e.note
            .as_deref()
            .map(|n| format!(" note={n:?}"))
            .unwrap_or_default()
    );
}

/// Runs a review-queue command.
pub async fn held(target: &Target, output: Output, command: HeldCommand) -> Result<(), CliError> {
    let mut client = connect(target).await?;
    let (payment_id, operator, note, resolution) = match command {
        HeldCommand::List => {
            let mut page_token = String::new();
            let mut all = Vec::new();
            loop {
                let first = page_token.is_empty();
                let page = client
                    .list_held(ListHeldRequest {
                        page_size: 50,
                        page_token,
                    })
                    .await?
                    .into_inner();
                if output.json {
                    all.extend(page.held);
                    if page.next_page_token.is_empty() {
                        return emit(&json::HeldList::of(&all));
                    }
                    page_token = page.next_page_token;
                    continue;
                }
                if page.held.is_empty() && first {
                    println!("no held payments");
                }
                for h in &page.held {
                    println!(
                        "{}  reason={}  state={}  wallet={}  body={}",
                        h.payment_id,
                        h.held_reason,
                        h.state,
                        h.wallet.as_deref().unwrap_or("-"),
                        h.event
                            .as_ref()
                            .map(|e| String::from_utf8_lossy(&e.raw_body).trim().to_owned())
                            .unwrap_or_default()
                    );
                }
                if page.next_page_token.is_empty() {
                    return Ok(());
                }
                page_token = page.next_page_token;
            }
        }
        HeldCommand::Approve {
            payment_id,
            operator,
            note,
            item,
        } => (
            payment_id,
            operator,
            note,
            Resolution::Approve(Approve { item }),
        ),
        HeldCommand::Reject {
            payment_id,
            operator,
            note,
        } => (payment_id, operator, note, Resolution::Reject(Reject {})),
    };
    let r = client
        .resolve_held(ResolveHeldRequest {
            payment_id: payment_id.clone(),
            operator,
            note,
            resolution: Some(resolution),
        })
        .await?
        .into_inner();
    if output.json {
        return emit(&json::Resolved::of(&payment_id, &r));
    }
    let again = if r.duplicate { " (already)" } else { "" };
    println!("{payment_id}: {}{again}", r.review);
    r.entries.iter().for_each(show_entry);
    Ok(())
}

/// Shows one payment.
pub async fn payment(target: &Target, output: Output, payment_id: String) -> Result<(), CliError> {
    let p = connect(target)
        .await?
        .get_payment(GetPaymentRequest { payment_id })
        .await?
        .into_inner()
        .payment
        .unwrap_or_default();
    if output.json {
        return emit(&json::Payment::of(&p));
    }
    println!("payment {}  state={}", p.payment_id, p.state);
    if let Some(reason) = &p.held_reason {
        println!("held: {reason}");
    }
    if let Some(review) = &p.review {
        println!("review: {review}");
    }
    println!("events:");
    for e in &p.events {
        let outcome = pb::Outcome::try_from(e.outcome)
            .unwrap_or_default()
            .as_str_name();
        println!("  {:<32} created={} {outcome}", e.event_type, e.created_raw);
    }
    println!("ledger:");
    p.ledger.iter().for_each(show_entry);
    Ok(())
}

/// Shows a payer's entitlements; says so when there are none.
pub async fn entitlements(
    target: &Target,
    output: Output,
    payer: pb::payer::Id,
) -> Result<(), CliError> {
    let r = connect(target)
        .await?
        .get_entitlements(GetEntitlementsRequest {
            payer: Some(pb::Payer {
                id: Some(payer.clone()),
            }),
        })
        .await?
        .into_inner();
    if output.json {
        return emit(&json::Entitlements::of(&payer, &r.entitlements));
    }
    if r.entitlements.is_empty() {
        let (pb::payer::Id::Wallet(id) | pb::payer::Id::RawCustomerId(id)) = &payer;
        println!("payer {id}: no entitlements");
    }
    for e in &r.entitlements {
        println!(
            "{:<24} {:>10}{}",
            e.sku,
            e.quantity,
            if e.debt { "  DEBT" } else { "" }
        );
    }
    Ok(())
}
