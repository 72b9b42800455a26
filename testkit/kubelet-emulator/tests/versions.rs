//! The emulator's own version behaviour, checked against a plugin server
//! without the framework: tonic as it comes, which refuses a path as
//! `:authority`. A 1.25 kubelet therefore cannot register it; a 1.34 one
//! can. This is what the framework's adapter exists for.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::time::Duration;

use devplugin_api::pb::device_plugin_server::{DevicePlugin, DevicePluginServer};
use devplugin_api::pb::registration_client::RegistrationClient;
use devplugin_api::{pb, uds};
use kubelet_emulator::{KubeletEmulator, KubeletVersion};
use tonic::{Request, Response, Status};

struct Bare;

#[tonic::async_trait]
impl DevicePlugin for Bare {
    async fn get_device_plugin_options(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<pb::DevicePluginOptions>, Status> {
        Ok(Response::new(pb::DevicePluginOptions::default()))
    }

    type ListAndWatchStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::ListAndWatchResponse, Status>> + Send>,
    >;

    /// One device, then the stream stays open.
    async fn list_and_watch(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        use tokio_stream::StreamExt as _;
        let one = pb::ListAndWatchResponse {
            devices: vec![pb::Device {
                id: "bare-0".into(),
                health: "Healthy".into(),
                topology: None,
            }],
        };
        Ok(Response::new(Box::pin(
            tokio_stream::once(Ok(one)).chain(tokio_stream::pending()),
        )))
    }

    async fn get_preferred_allocation(
        &self,
        _: Request<pb::PreferredAllocationRequest>,
    ) -> Result<Response<pb::PreferredAllocationResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }

    async fn allocate(
        &self,
        _: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }

    async fn pre_start_container(
        &self,
        _: Request<pb::PreStartContainerRequest>,
    ) -> Result<Response<pb::PreStartContainerResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
}

async fn register_bare(
    version: KubeletVersion,
) -> (Result<(), Status>, KubeletEmulator, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = KubeletEmulator::start_as(dir.path(), version)
        .await
        .unwrap();
    let listener = tokio::net::UnixListener::bind(dir.path().join("bare.sock")).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DevicePluginServer::new(Bare))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let channel = uds::connect(&dir.path().join("kubelet.sock"), Duration::from_secs(5))
        .await
        .unwrap();
    let answer = RegistrationClient::new(channel)
        .register(pb::RegisterRequest {
            version: "v1beta1".into(),
            endpoint: "bare.sock".into(),
            resource_name: "example.com/bare".into(),
            options: None,
        })
        .await
        .map(drop);
    (answer, kubelet, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_25_kubelet_sends_the_socket_path_as_authority() {
    let err = register_bare(KubeletVersion::V1_25).await.0.unwrap_err();
    // `GetDevicePluginOptions` inside `Register` was reset by h2; the
    // kubelet's plain Go error arrives as Unknown.
    assert_eq!(err.code(), tonic::Code::Unknown, "{err:?}");
    assert!(
        err.message()
            .starts_with("failed to get device plugin options"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_34_kubelet_sends_localhost() {
    register_bare(KubeletVersion::V1_34).await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_the_kubelets_words_as_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = KubeletEmulator::start(dir.path()).await.unwrap();
    let channel = uds::connect(&kubelet.socket_path(), Duration::from_secs(5))
        .await
        .unwrap();
    let mut client = RegistrationClient::new(channel);
    let cases = [
        (
            "v1alpha",
            "example.com/x",
            "requested API version \"v1alpha\" is not supported by kubelet. Supported version is [\"v1beta1\"]",
        ),
        ("v1beta1", "x", "the ResourceName \"x\" is invalid"),
        ("v1beta1", "example.com/x", "failed to dial device plugin: "),
    ];
    for (version, name, message) in cases {
        let err = client
            .register(pb::RegisterRequest {
                version: version.into(),
                endpoint: "../../nowhere.sock".into(),
                resource_name: name.into(),
                options: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unknown);
        assert!(err.message().starts_with(message), "{err:?}");
    }
    assert_eq!(
        kubelet.view().register_calls,
        3,
        "every call counts, refused ones too"
    );
    assert_eq!(kubelet.view().rejected.len(), 2);
}

/// 1.24 answers `Register` before it dials back: a plugin whose server
/// refuses the path authority "registers" and then never gets a stream
/// (the dial-back failure is only logged by the kubelet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_24_kubelet_answers_first_and_fails_the_dial_back_silently() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = KubeletEmulator::start_as(dir.path(), KubeletVersion::V1_24)
        .await
        .unwrap();
    let listener = tokio::net::UnixListener::bind(dir.path().join("bare.sock")).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DevicePluginServer::new(Bare))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let channel = uds::connect(&kubelet.socket_path(), Duration::from_secs(5))
        .await
        .unwrap();
    RegistrationClient::new(channel)
        .register(pb::RegisterRequest {
            version: "v1beta1".into(),
            endpoint: "bare.sock".into(),
            resource_name: "example.com/bare".into(),
            options: Some(pb::DevicePluginOptions {
                pre_start_required: false,
                get_preferred_allocation_available: true,
            }),
        })
        .await
        .expect("1.24 answers before dialling back");
    // The connection is made (the authority goes only with the first call),
    // then ListAndWatch is reset: the resource is registered, and drops.
    let v = kubelet
        .wait_until(Duration::from_secs(10), |v| {
            v.registrations("example.com/bare") == 1 && !v.is_connected("example.com/bare")
        })
        .await
        .unwrap();
    assert!(v.devices("example.com/bare").is_none(), "{v:?}");
    assert!(
        v.resources["example.com/bare"]
            .options
            .get_preferred_allocation_available,
        "the request's options"
    );
}

/// The control: 1.34 sends `localhost`, and the same bare plugin streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_34_kubelet_gets_the_bare_plugins_list() {
    let (answer, kubelet, _dir) = register_bare(KubeletVersion::V1_34).await;
    answer.unwrap();
    kubelet
        .wait_until(Duration::from_secs(10), |v| {
            v.devices("example.com/bare")
                .is_some_and(|d| d.devices().len() == 1)
        })
        .await
        .unwrap();
}
