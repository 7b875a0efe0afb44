//! Fleet tooling works without our .proto: the standard gRPC health service reports vmmd serving, and
//! server reflection lists `vmmd.v1.Vmm` and describes it (what `grpcurl -unix SOCK list` relies on).

use std::path::Path;

use cpr_tests::{VmmdOptions, VmmdProcess};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

async fn channel(socket: &Path) -> Channel {
    let socket = socket.to_path_buf();
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .expect("connect to the vmmd API socket")
}

async fn reflect(ch: Channel, request: MessageRequest) -> MessageResponse {
    let mut client = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("reflection call")
        .into_inner();
    stream
        .message()
        .await
        .expect("reflection answer")
        .and_then(|r| r.message_response)
        .expect("a reflection response")
}

#[test]
fn health_and_reflection_are_served() {
    let vmm = VmmdProcess::spawn(VmmdOptions::new(1, "64M"));
    let socket = vmm.api().socket().to_path_buf();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let ch = channel(&socket).await;
        let mut health = HealthClient::new(ch.clone());
        for service in ["", "vmmd.v1.Vmm"] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.to_string(),
                })
                .await
                .unwrap_or_else(|e| panic!("health check of {service:?}: {e}"))
                .into_inner()
                .status;
            assert_eq!(
                status,
                ServingStatus::Serving as i32,
                "health of {service:?}"
            );
        }

        let MessageResponse::ListServicesResponse(list) =
            reflect(ch.clone(), MessageRequest::ListServices(String::new())).await
        else {
            panic!("ListServices answered with something else");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"vmmd.v1.Vmm"), "services: {names:?}");
        assert!(
            names.contains(&"grpc.health.v1.Health"),
            "services: {names:?}"
        );

        let MessageResponse::FileDescriptorResponse(files) = reflect(
            ch,
            MessageRequest::FileContainingSymbol("vmmd.v1.Vmm".into()),
        )
        .await
        else {
            panic!("FileContainingSymbol answered with something else");
        };
        assert!(
            !files.file_descriptor_proto.is_empty(),
            "no descriptor for vmmd.v1.Vmm"
        );
    });
}
