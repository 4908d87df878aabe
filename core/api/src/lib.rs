//! The containerd API as Switchyard speaks it.
//!
//! * the client API (`containerd.services.*.v1`, gRPC) that `ctr` and `yard` use against
//!   switchyardd,
//! * the shim task API (`containerd.task.v2`; the same messages serve `containerd.task.v3`)
//!   that switchyardd speaks to shims over ttrpc,
//! * events (`containerd.events.*`) and the ttrpc events service shims publish to,
//! * Kubernetes' CRI v1 (`runtime.v1`), for kubelet-facing clients and servers.
//!
//! The `.proto` files are vendored from containerd under `proto/`.

pub mod cgroups;
pub mod cri_defaults;
pub mod cri_log;
pub mod cri_stream;
pub mod typeurl;

/// Kubernetes' Container Runtime Interface, `runtime.v1` (`RuntimeService`, `ImageService`):
/// vendored from cri-api (see `proto/README.md` for the version).
#[allow(clippy::all, clippy::pedantic, unreachable_pub)]
pub mod cri {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/runtime.v1.rs"));
    }
}

macro_rules! generated {
    ($file:literal) => {
        include!(concat!(env!("OUT_DIR"), "/", $file, ".rs"));
    };
}

#[allow(clippy::all, clippy::pedantic, unreachable_pub)]
pub mod google {
    pub mod rpc {
        generated!("google.rpc");
    }
}

#[allow(clippy::all, clippy::pedantic, unreachable_pub)]
pub mod runtimeoptions {
    pub mod v1 {
        generated!("runtimeoptions.v1");
    }
}

#[allow(clippy::all, clippy::pedantic, unreachable_pub)]
pub mod containerd {
    pub mod types {
        generated!("containerd.types");
    }
    pub mod v1 {
        pub mod types {
            generated!("containerd.v1.types");
        }
    }
    pub mod events {
        generated!("containerd.events");
    }
    pub mod runc {
        pub mod v1 {
            generated!("containerd.runc.v1");
        }
    }
    pub mod task {
        pub mod v2 {
            generated!("ttrpc/containerd.task.v2");
        }
    }
    pub mod services {
        pub mod containers {
            pub mod v1 {
                generated!("containerd.services.containers.v1");
            }
        }
        pub mod content {
            pub mod v1 {
                generated!("containerd.services.content.v1");
            }
        }
        pub mod diff {
            pub mod v1 {
                generated!("containerd.services.diff.v1");
            }
        }
        pub mod events {
            pub mod v1 {
                generated!("containerd.services.events.v1");
            }
            pub mod ttrpc {
                pub mod v1 {
                    generated!("ttrpc/containerd.services.events.ttrpc.v1");
                }
            }
        }
        pub mod images {
            pub mod v1 {
                generated!("containerd.services.images.v1");
            }
        }
        pub mod introspection {
            pub mod v1 {
                generated!("containerd.services.introspection.v1");
            }
        }
        pub mod leases {
            pub mod v1 {
                generated!("containerd.services.leases.v1");
            }
        }
        pub mod namespaces {
            pub mod v1 {
                generated!("containerd.services.namespaces.v1");
            }
        }
        pub mod snapshots {
            pub mod v1 {
                generated!("containerd.services.snapshots.v1");
            }
        }
        pub mod tasks {
            pub mod v1 {
                generated!("containerd.services.tasks.v1");
            }
        }
        pub mod version {
            pub mod v1 {
                generated!("containerd.services.version.v1");
            }
        }
    }
}

/// Switchyard's own services (`proto/switchyard/`).
#[allow(clippy::all, clippy::pedantic, unreachable_pub)]
pub mod switchyard {
    pub mod images {
        pub mod v1 {
            generated!("switchyard.images.v1");
        }
    }
}

pub mod client;
pub mod events;
