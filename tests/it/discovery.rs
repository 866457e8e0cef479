//! What a client finds on the port before it knows the API: gRPC health, and reflection.

use tokio_stream::StreamExt;
use tonic::Code;

use crate::support::{TestServer, assert_status};

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_harmonizer() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "ghm.v1.Harmonizer"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap_or_else(|e| panic!("health check of {service:?}: {e}"))
            .into_inner();
        assert_eq!(
            response.status(),
            ServingStatus::Serving,
            "health of {service:?}"
        );
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".to_owned(),
        })
        .await;
    assert_status(unknown, Code::NotFound, &[], "health of an unknown service");
    server.stop().await;
}

#[tokio::test]
async fn reflection_lists_and_describes_the_harmonizer() {
    use prost::Message;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let server = TestServer::start().await;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let ask = |message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "ghm.v1.Harmonizer".to_owned(),
        )),
    ];
    let responses: Vec<ServerReflectionResponse> = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection stream")
        .into_inner()
        .collect::<Result<_, _>>()
        .await
        .expect("reflection answers");
    assert_eq!(responses.len(), 2);

    let Some(MessageResponse::ListServicesResponse(list)) = &responses[0].message_response else {
        panic!("not a service list: {:?}", responses[0]);
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in ["ghm.v1.Harmonizer", "grpc.health.v1.Health"] {
        assert!(names.contains(&expected), "{expected} not in {names:?}");
    }

    let Some(MessageResponse::FileDescriptorResponse(files)) = &responses[1].message_response
    else {
        panic!("no descriptor: {:?}", responses[1]);
    };
    let harmonizer = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).expect("decode"))
        .flat_map(|file| file.service)
        .find(|service| service.name() == "Harmonizer")
        .expect("the descriptor holds the Harmonizer service");
    let methods: Vec<&str> = harmonizer.method.iter().map(|m| m.name()).collect();
    for expected in [
        "CreateJob",
        "GetJob",
        "ListJobs",
        "DeleteJob",
        "Harmonize",
        "HarmonizeStream",
    ] {
        assert!(methods.contains(&expected), "{expected} not in {methods:?}");
    }
    server.stop().await;
}
