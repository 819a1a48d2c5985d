//! Task events for containerd (TaskCreate, TaskStart, TaskExit, …): queued
//! in order and forwarded by one task to containerd's event service over
//! `TTRPC_ADDRESS`, so publishing never blocks a Task API call.

use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::context::Context;
use tokio::sync::mpsc;

/// One event: its topic and message.
#[derive(Debug)]
pub struct Event {
    /// containerd's topic (`/tasks/exit`, …).
    pub topic: &'static str,
    /// The event message.
    pub message: Box<dyn MessageDyn>,
}

/// Task event messages the shim publishes.
pub trait TaskEvent: MessageDyn + Sized {
    /// The event's topic.
    const TOPIC: &'static str;
}

macro_rules! task_events {
    ($($event:ty => $topic:expr),* $(,)?) => {
        $(impl TaskEvent for $event {
            const TOPIC: &'static str = $topic;
        })*
    };
}

task_events! {
    TaskCreate => topics::TASK_CREATE_EVENT_TOPIC,
    TaskStart => topics::TASK_START_EVENT_TOPIC,
    TaskExit => topics::TASK_EXIT_EVENT_TOPIC,
    TaskOOM => topics::TASK_OOM_EVENT_TOPIC,
    TaskExecAdded => topics::TASK_EXEC_ADDED_EVENT_TOPIC,
    TaskExecStarted => topics::TASK_EXEC_STARTED_EVENT_TOPIC,
    TaskPaused => topics::TASK_PAUSED_EVENT_TOPIC,
    TaskResumed => topics::TASK_RESUMED_EVENT_TOPIC,
    TaskDelete => topics::TASK_DELETE_EVENT_TOPIC,
}

/// The shim's event queue.
#[derive(Debug, Clone)]
pub struct Events {
    queue: mpsc::UnboundedSender<Event>,
}

impl Events {
    /// A queue whose events arrive at `receiver` (tests read them there).
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<Event>) {
        let (queue, receiver) = mpsc::unbounded_channel();
        (Self { queue }, receiver)
    }

    /// A queue whose events go nowhere: a task served for a client
    /// without an event service (`capsid run`).
    pub fn discarded() -> Self {
        let (events, mut receiver) = Self::channel();
        tokio::spawn(async move { while receiver.recv().await.is_some() {} });
        events
    }

    /// A queue forwarded to containerd by `publisher` in `namespace`.
    pub fn forward_to(publisher: RemotePublisher, namespace: String) -> Self {
        let (events, mut receiver) = Self::channel();
        tokio::spawn(async move {
            while let Some(event) = receiver.recv().await {
                let topic = event.topic;
                if let Err(e) = publisher
                    .publish(Context::default(), topic, &namespace, event.message)
                    .await
                {
                    tracing::warn!(topic, error = %e, "cannot publish event");
                }
            }
        });
        events
    }

    /// Queues `event`.
    pub fn publish<E: TaskEvent>(&self, event: E) {
        tracing::debug!(topic = E::TOPIC, "event");
        let event = Event {
            topic: E::TOPIC,
            message: Box::new(event),
        };
        if self.queue.send(event).is_err() {
            tracing::warn!(topic = E::TOPIC, "event queue closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_keep_their_order_and_topics() {
        let (events, mut rx) = Events::channel();
        events.publish(TaskStart {
            container_id: "c".into(),
            pid: 1,
            ..Default::default()
        });
        events.publish(TaskExit {
            container_id: "c".into(),
            exit_status: 3,
            ..Default::default()
        });
        let first = rx.try_recv().unwrap();
        assert_eq!(first.topic, "/tasks/start");
        let second = rx.try_recv().unwrap();
        assert_eq!(second.topic, "/tasks/exit");
        assert_eq!(
            second.message.descriptor_dyn().full_name(),
            "containerd.events.TaskExit"
        );
    }
}
