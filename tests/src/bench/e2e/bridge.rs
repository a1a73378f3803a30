//! The do-it-yourself baseline of the uplink measurement: a gateway Mosquitto bridged to a
//! cloud Mosquitto, the bridge connection running through a counting [`TcpRelay`].
//!
//! This is what teams build before Tributary: sensors publish JSON to a broker on the
//! gateway and a bridge forwards every message to a broker in the cloud at QoS 1. Both
//! brokers are extra `mosquitto` processes on free loopback ports with generated configs
//! (the shared dev Mosquitto is left alone). A subscriber on the cloud broker counts what
//! arrived, so the bytes are read only once every message crossed the bridge.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use tributary_firmware_sim::cluster::{free_tcp_port, wait_for, TcpRelay};

use super::mqtt::Publisher;

/// The topic filter the bridge forwards (everything the fleet publishes).
const BRIDGED_TOPICS: &str = "site/#";

/// A `mosquitto` process, killed when dropped.
struct Mosquitto {
    child: Child,
    address: SocketAddr,
}

impl Mosquitto {
    fn start(name: &str, dir: &Path, extra_config: &str) -> anyhow::Result<Self> {
        let port = free_tcp_port()?;
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let config_path = dir.join(format!("{name}.conf"));
        let config = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_inflight_messages 1000\nmax_queued_messages 1000000\n{extra_config}\n"
        );
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut command = Command::new("mosquitto");
        command
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().context(
            "starting `mosquitto` for the bridge baseline; install it (`apt-get install mosquitto`)",
        )?;
        let ready = wait_for(
            &format!("mosquitto {name} on {address}"),
            Duration::from_secs(10),
            || {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "mosquitto {name} exited with {status}: {}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                Ok(
                    TcpStream::connect_timeout(&address, Duration::from_millis(200))
                        .ok()
                        .map(|_| ()),
                )
            },
        );
        if let Err(error) = ready {
            let _ = child.kill();
            let _ = child.wait();
            return Err(error);
        }
        Ok(Self { child, address })
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A subscriber on the cloud broker counting the messages that arrive.
struct CloudSubscriber {
    client: Client,
    received: Arc<AtomicU64>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CloudSubscriber {
    fn start(address: SocketAddr) -> anyhow::Result<Self> {
        let mut options = MqttOptions::new(
            "bench-cloud-counter",
            address.ip().to_string(),
            address.port(),
        );
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut connection) = Client::new(options, 100);
        let received = Arc::new(AtomicU64::new(0));
        let subscribed = Arc::new(AtomicBool::new(false));
        let stopping = Arc::new(AtomicBool::new(false));
        client
            .subscribe(BRIDGED_TOPICS, QoS::AtMostOnce)
            .context("subscribing on the cloud broker")?;
        let thread = {
            let (received, subscribed, stopping) =
                (received.clone(), subscribed.clone(), stopping.clone());
            std::thread::spawn(move || {
                for event in connection.iter() {
                    match event {
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subscribed.store(true, Ordering::SeqCst);
                        }
                        Ok(Event::Incoming(Packet::Publish(_))) => {
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(_) if stopping.load(Ordering::SeqCst) => break,
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            })
        };
        let subscriber = Self {
            client,
            received,
            stopping,
            thread: Some(thread),
        };
        wait_for(
            "the cloud subscriber's SUBACK",
            Duration::from_secs(10),
            || Ok(subscribed.load(Ordering::SeqCst).then_some(())),
        )?;
        Ok(subscriber)
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for CloudSubscriber {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.client.disconnect();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Gateway broker -> counting relay -> cloud broker, with a counter on the cloud side.
pub struct Bridge {
    // Field order is drop order: stop the gateway (and its bridge) before the relay.
    subscriber: CloudSubscriber,
    gateway: Mosquitto,
    pub relay: TcpRelay,
    _cloud: Mosquitto,
}

impl Bridge {
    /// Starts both brokers and the relay, and waits until a probe message crossed the bridge.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let cloud = Mosquitto::start("cloud-mosquitto", dir, "")?;
        let relay = TcpRelay::start(cloud.address)?;
        // QoS 1 out, as a bridge that must not lose data is configured; no notification
        // topics, so only fleet messages cross.
        let bridge_config = format!(
            "connection cloud\naddress {relay}\ntopic {BRIDGED_TOPICS} out 1\n\
             cleansession true\nnotifications false\ntry_private false\n\
             bridge_protocol_version mqttv311\nbridge_attempt_unsubscribe false\n\
             keepalive_interval 60\nstart_type automatic\nrestart_timeout 1\n",
            relay = relay.address
        );
        let gateway = Mosquitto::start("gateway-mosquitto", dir, &bridge_config)?;
        let subscriber = CloudSubscriber::start(cloud.address)?;
        let bridge = Self {
            subscriber,
            gateway,
            relay,
            _cloud: cloud,
        };
        // The bridge connects on its own schedule: probe until a message crosses.
        let mut probe = Publisher::connect(bridge.gateway.address, "bench-bridge-probe")?;
        wait_for(
            "the Mosquitto bridge to carry a probe",
            Duration::from_secs(30),
            || {
                if bridge.subscriber.received() > 0 {
                    return Ok(Some(()));
                }
                probe.publish("site/probe/dev/probe", b"{\"probe\":1}".to_vec())?;
                Ok(None)
            },
        )?;
        probe.wait_acknowledged(Duration::from_secs(10))?;
        let probes = probe.published();
        wait_for(
            "every probe to cross the bridge",
            Duration::from_secs(10),
            || Ok((bridge.delivered() >= probes).then_some(())),
        )?;
        Ok(bridge)
    }

    /// Where the fleet publishes (the gateway broker).
    pub fn gateway_address(&self) -> SocketAddr {
        self.gateway.address
    }

    /// Messages that reached the cloud broker so far (probes included).
    pub fn delivered(&self) -> u64 {
        self.subscriber.received()
    }

    /// Relay bytes both ways so far.
    pub fn bytes(&self) -> (u64, u64) {
        (self.relay.bytes_up(), self.relay.bytes_down())
    }
}
