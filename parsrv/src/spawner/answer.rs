//! Answers control requests: a group's own socket (status, show, resize, restart, remove)
//! and the spawner's socket (add groups).

use std::rc::Rc;

use super::Spawner;
use crate::control::{ControlError, Request, Response};

impl Spawner {
    /// A request to the spawner's own socket.
    pub(super) async fn answer_spawner(self: Rc<Self>, request: Request) -> Response {
        match request {
            Request::Add { groups } => {
                // All or nothing: check every group first, then start them; a failure
                // stops the ones this request started.
                for spec in &groups {
                    if let Err(e) = spec.validate() {
                        return Response::Failed(e.into());
                    }
                }
                let mut started: Vec<String> = Vec::new();
                for spec in groups {
                    let name = spec.name.clone();
                    if let Err(e) = self.start_group(spec) {
                        for done in &started {
                            self.remove_group(done).await;
                        }
                        return Response::Failed(match ControlError::from(e) {
                            ControlError::Failed(message) => {
                                ControlError::Failed(format!("group {name}: {message}"))
                            }
                            refused => refused,
                        });
                    }
                    started.push(name);
                }
                Response::Done(format!("started {}", started.join(", ")))
            }
            Request::Upgrade => match self.upgrade() {
                Ok(message) => Response::Done(message),
                Err(e) => Response::Failed(e.into()),
            },
            other => Response::Failed(ControlError::WrongSocket {
                request: other.verb(),
                fix: "a spawner's own socket only takes `add` and `upgrade`; send it to the group's socket"
                    .into(),
            }),
        }
    }

    /// A request to group `name`'s socket.
    pub(super) async fn answer(self: Rc<Self>, name: &str, request: Request) -> Response {
        let Some(group) = self.group(name) else {
            return Response::Failed(ControlError::Stopping {
                group: name.to_owned(),
            });
        };
        let done = |result: Result<String, ControlError>| match result {
            Ok(message) => Response::Done(message),
            Err(e) => Response::Failed(e),
        };
        match request {
            Request::Status => match group.status() {
                Ok(status) => Response::Status(Box::new(status)),
                Err(e) => Response::Failed(e.into()),
            },
            Request::Room => Response::Room(group.room()),
            Request::Show => Response::Spec(Box::new(group.spec.clone())),
            Request::Remove => {
                self.remove_group(name).await;
                Response::Done(format!("group {name}: drained and stopped"))
            }
            Request::Resize { handlers } => done(group.resize(handlers).await),
            Request::Restart => done(group.restart_all().await),
            Request::Affinity { client } => match group.affinity_entries(client) {
                Ok(entries) => Response::Affinity(entries),
                Err(e) => Response::Failed(e),
            },
            Request::Add { .. } | Request::Upgrade => Response::Failed(ControlError::WrongSocket {
                request: request.verb(),
                fix: "send it to the spawner: `parsrv group add`, `parsrv upgrade`".into(),
            }),
            Request::Drain => Response::Failed(ControlError::WrongSocket {
                request: request.verb(),
                fix: "it is a cluster agent's: `parsrv cluster drain`".into(),
            }),
        }
    }
}
