//! Generates Rust types for the vendored containerd and CRI protobufs (see `proto/README.md`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("proto");
    let api = root.join("github.com/containerd/containerd/api");
    let files = [
        "types/descriptor.proto",
        "types/event.proto",
        "types/introspection.proto",
        "types/metrics.proto",
        "types/mount.proto",
        "types/platform.proto",
        "types/task/task.proto",
        "types/runc/options/oci.proto",
        "types/runtimeoptions/v1/api.proto",
        "events/container.proto",
        "events/content.proto",
        "events/image.proto",
        "events/namespace.proto",
        "events/snapshot.proto",
        "events/task.proto",
        "services/containers/v1/containers.proto",
        "services/content/v1/content.proto",
        "services/diff/v1/diff.proto",
        "services/events/v1/events.proto",
        "services/images/v1/images.proto",
        "services/introspection/v1/introspection.proto",
        "services/leases/v1/leases.proto",
        "services/namespaces/v1/namespace.proto",
        "services/snapshots/v1/snapshots.proto",
        "services/tasks/v1/tasks.proto",
        "services/version/v1/version.proto",
    ]
    .map(|f| api.join(f))
    .into_iter()
    .chain([root.join("switchyard/images/v1/images.proto")])
    .collect::<Vec<_>>();

    // gRPC services (client and server): the client API switchyardd serves.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Methods a service does not override answer UNIMPLEMENTED instead of failing to compile.
        .generate_default_stubs(true)
        .compile_with_config(config(), &files, std::slice::from_ref(&root))?;

    // Kubernetes' CRI v1 (`runtime.v1`): what kubelet speaks to a container runtime. Its
    // credentials carry `[debug_redact = true]`, a field option protoc learned in 22; Debian 12's
    // protoc is 3.21. The option only changes how Go and C++ print a message, so the vendored
    // file is compiled from a copy without it (the file itself stays as upstream wrote it).
    let cri = "k8s.io/cri-api/pkg/apis/runtime/v1/api.proto";
    println!("cargo:rerun-if-changed=proto/{cri}");
    let cri_dir = PathBuf::from(std::env::var("OUT_DIR")?).join("cri-proto");
    let cri_copy = cri_dir.join(cri);
    std::fs::create_dir_all(cri_copy.parent().ok_or("proto path")?)?;
    let text = std::fs::read_to_string(root.join(cri))?;
    std::fs::write(&cri_copy, text.replace(" [debug_redact = true]", ""))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .generate_default_stubs(true)
        .compile_with_config(config(), &[cri_copy], &[cri_dir])?;

    // ttrpc services: messages only; switchyardd speaks ttrpc through `ttrpc`'s raw client and
    // server, choosing the service name (task v2 or v3) at run time.
    let ttrpc_files = [
        "runtime/task/v2/shim.proto",
        "services/ttrpc/events/v1/events.proto",
    ]
    .map(|f| api.join(f));
    // prost writes every package the files import, so this pass gets its own directory and only
    // its own two packages are included from it.
    let ttrpc_out = PathBuf::from(std::env::var("OUT_DIR")?).join("ttrpc");
    std::fs::create_dir_all(&ttrpc_out)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .out_dir(ttrpc_out)
        .compile_with_config(config(), &ttrpc_files, &[root])?;
    Ok(())
}

fn config() -> tonic_prost_build::Config {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_arg("--experimental_allow_proto3_optional");
    config.enable_type_names();
    config
}
