//! What `grpcurl` relies on: server reflection (v1) lists and describes every service, and
//! `grpc.health.v1` reports each one.

use coinflow_tests::{Stack, channel};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn reflect(stack: &Stack, request: MessageRequest) -> MessageResponse {
    let mut client = ServerReflectionClient::new(channel(stack.fulfillment.addr).await);
    let outbound = tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    }]);
    let mut inbound = client
        .server_reflection_info(outbound)
        .await
        .unwrap()
        .into_inner();
    inbound
        .message()
        .await
        .unwrap()
        .unwrap()
        .message_response
        .unwrap()
}

#[tokio::test]
async fn reflection_lists_and_describes_the_services() {
    let stack = Stack::start().await;
    let MessageResponse::ListServicesResponse(list) =
        reflect(&stack, MessageRequest::ListServices(String::new())).await
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "coinflow.fulfillment.v1.Ingest",
        "coinflow.fulfillment.v1.Fulfillment",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let MessageResponse::FileDescriptorResponse(files) = reflect(
        &stack,
        MessageRequest::FileContainingSymbol("coinflow.fulfillment.v1.Fulfillment".into()),
    )
    .await
    else {
        panic!("expected descriptors");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

#[tokio::test]
async fn health_reports_every_service_serving() {
    let stack = Stack::start().await;
    let mut client = HealthClient::new(channel(stack.fulfillment.addr).await);
    for service in [
        "",
        "coinflow.fulfillment.v1.Ingest",
        "coinflow.fulfillment.v1.Fulfillment",
    ] {
        let status = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, 1, "{service:?} should be SERVING");
    }
}
