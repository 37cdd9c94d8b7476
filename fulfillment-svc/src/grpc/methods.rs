//! The one table of the gRPC methods fulfillment-svc serves: who may call each, and the
//! names spans and metrics use. A request path outside the table is refused by
//! [`super::auth`] and labelled `unknown`, so a caller cannot grow the metric series.

/// What a credential may do. Each token belongs to exactly one role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The edge (and any route's own caller): `Ingest.*`.
    Ingest,
    /// Game servers and tools: entitlements, payments, the ledger, spending.
    Query,
    /// Support staff: the review queue, whose payloads carry customer data.
    Operator,
    /// `fulfillment-svc recover`: looks events and payments up, and records what Coinflow
    /// stopped retrying (such events are marked recovered).
    Recovery,
}

impl Role {
    /// The role's name in messages and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Query => "query",
            Self::Operator => "operator",
            Self::Recovery => "recovery",
        }
    }
}

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: health checks and reflection (they reveal nothing recorded).
    Open,
    /// Only a credential of one of these roles.
    Roles(&'static [Role]),
}

/// One served method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    /// The fully qualified service name.
    pub service: &'static str,
    /// The method name.
    pub method: &'static str,
    /// Who may call it.
    pub access: Access,
}

const INGEST: &str = "coinflow.fulfillment.v1.Ingest";
const FULFILLMENT: &str = "coinflow.fulfillment.v1.Fulfillment";

const fn m(service: &'static str, method: &'static str, access: Access) -> Method {
    Method {
        service,
        method,
        access,
    }
}

const INGESTING: Access = Access::Roles(&[Role::Ingest, Role::Recovery]);
const QUERY: Access = Access::Roles(&[Role::Query]);
const LOOKUP: Access = Access::Roles(&[Role::Query, Role::Recovery]);
const OPERATOR: Access = Access::Roles(&[Role::Operator]);

/// Every method served.
pub const METHODS: &[Method] = &[
    m("grpc.health.v1.Health", "Check", Access::Open),
    m("grpc.health.v1.Health", "Watch", Access::Open),
    m(
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
        Access::Open,
    ),
    m(
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
        Access::Open,
    ),
    m(INGEST, "Deliver", INGESTING),
    m(INGEST, "DeliverBatch", INGESTING),
    m(FULFILLMENT, "GetEntitlements", QUERY),
    m(FULFILLMENT, "GetPayment", LOOKUP),
    m(FULFILLMENT, "GetEvent", LOOKUP),
    m(FULFILLMENT, "ListLedger", QUERY),
    m(FULFILLMENT, "WatchEntitlements", QUERY),
    m(FULFILLMENT, "Consume", QUERY),
    m(FULFILLMENT, "ListHeld", OPERATOR),
    m(FULFILLMENT, "ResolveHeld", OPERATOR),
];

/// The method a request path (`/package.Service/Method`) names, if it is one served.
pub fn lookup(path: &str) -> Option<&'static Method> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    METHODS
        .iter()
        .find(|m| m.service == service && m.method == method)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message;
    use prost_types::FileDescriptorSet;

    use super::*;

    /// The table must name every method of this system's services, so none is served
    /// without a role, and nothing the services do not have.
    #[test]
    fn the_table_matches_the_services_served() {
        let set = FileDescriptorSet::decode(coinflow_shared::proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut served = BTreeSet::new();
        for file in &set.file {
            for service in &file.service {
                let name = format!("{}.{}", file.package(), service.name());
                for method in &service.method {
                    served.insert(format!("{name}/{}", method.name()));
                }
            }
        }
        let ours: BTreeSet<String> = METHODS
            .iter()
            .filter(|m| m.service.starts_with("coinflow."))
            .map(|m| format!("{}/{}", m.service, m.method))
            .collect();
        assert_eq!(ours, served);
    }

    #[test]
    fn paths_resolve_exactly() {
        let batch = lookup("/coinflow.fulfillment.v1.Ingest/DeliverBatch").unwrap();
        assert_eq!(batch.access, INGESTING);
        assert_eq!(
            lookup("/coinflow.fulfillment.v1.Fulfillment/ResolveHeld")
                .unwrap()
                .access,
            OPERATOR
        );
        for path in [
            "",
            "/",
            "coinflow.fulfillment.v1.Ingest/Deliver",
            "/coinflow.fulfillment.v1.Ingest/Deliver/x",
            "/coinflow.fulfillment.v1.Ingest/deliver",
            "/x/y",
        ] {
            assert_eq!(lookup(path), None, "{path}");
        }
    }
}
