//! The task manager: every long-lived task and thread of a node, by name, with one
//! cancellation token to stop them and a bounded join.

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

enum Running {
    Task(JoinHandle<()>),
    Thread(std::thread::JoinHandle<()>),
}

/// Owns the node's long-lived tasks (async tasks and OS threads).
pub struct TaskManager {
    token: CancellationToken,
    running: Vec<(&'static str, Running)>,
}

impl Default for TaskManager {
    fn default() -> Self {
        TaskManager::new()
    }
}

impl TaskManager {
    /// No tasks yet.
    pub fn new() -> TaskManager {
        TaskManager {
            token: CancellationToken::new(),
            running: Vec::new(),
        }
    }

    /// The token tasks watch: cancelled when [`TaskManager::shutdown`] starts.
    pub fn token(&self) -> CancellationToken {
        self.token.child_token()
    }

    /// Adds an async task.
    pub fn add_task(&mut self, name: &'static str, task: JoinHandle<()>) {
        self.running.push((name, Running::Task(task)));
    }

    /// Adds an OS thread (it must end by other means, e.g. a command, once the token is
    /// cancelled).
    pub fn add_thread(&mut self, name: &'static str, thread: std::thread::JoinHandle<()>) {
        self.running.push((name, Running::Thread(thread)));
    }

    /// Cancels the token and joins every task in the order added, until `deadline`; returns
    /// the names of those still running then (they are abandoned: tasks aborted, threads
    /// detached).
    pub async fn shutdown(mut self, deadline: Instant) -> Vec<&'static str> {
        self.token.cancel();
        let mut stuck = Vec::new();
        for (name, running) in std::mem::take(&mut self.running) {
            // Those already finished count as stopped even once the deadline has passed.
            let done = match running {
                Running::Task(task) if task.is_finished() => true,
                Running::Task(mut task) => {
                    match tokio::time::timeout_at(deadline, &mut task).await {
                        Ok(_) => true,
                        Err(_) => {
                            task.abort();
                            false
                        }
                    }
                }
                Running::Thread(thread) if thread.is_finished() => {
                    let _ = thread.join();
                    true
                }
                Running::Thread(thread) => {
                    let join = tokio::task::spawn_blocking(move || thread.join());
                    tokio::time::timeout_at(deadline, join).await.is_ok()
                }
            };
            if done {
                debug!(task = name, "stopped");
            } else {
                stuck.push(name);
            }
        }
        stuck
    }
}

impl Drop for TaskManager {
    /// A manager dropped without [`TaskManager::shutdown`] (a node whose start failed half
    /// way) still tells its tasks to stop.
    fn drop(&mut self) {
        self.token.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn shutdown_cancels_joins_and_names_the_tasks_that_do_not_stop() {
        let mut tasks = TaskManager::new();
        let token = tasks.token();
        tasks.add_task(
            "polite",
            tokio::spawn(async move { token.cancelled().await }),
        );
        tasks.add_task(
            "stubborn",
            tokio::spawn(tokio::time::sleep(Duration::from_secs(3600))),
        );
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        tasks.add_thread(
            "thread",
            std::thread::spawn(move || {
                let _ = rx.recv();
            }),
        );
        drop(tx);
        let started = Instant::now();
        let stuck = tasks
            .shutdown(Instant::now() + Duration::from_millis(300))
            .await;
        assert_eq!(stuck, ["stubborn"]);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_dropped_manager_cancels_its_tasks() {
        let mut tasks = TaskManager::new();
        let token = tasks.token();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tasks.add_task(
            "polite",
            tokio::spawn(async move {
                token.cancelled().await;
                let _ = tx.send(());
            }),
        );
        drop(tasks);
        tokio::time::timeout(Duration::from_secs(2), rx)
            .await
            .expect("cancelled within 2 s")
            .expect("the task saw the cancellation");
    }
}
