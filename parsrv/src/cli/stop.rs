//! `parsrv stop`: remove a group through its spawner, or take it over when its spawner died.

use super::group::done;
use crate::{
    control::{self, Request},
    error::Result,
    spawner,
};

pub(super) fn stop(group: &str) -> Result<()> {
    if control::is_live(&control::socket_path(group)) {
        return done(group.to_owned(), control::request(group, &Request::Remove)?);
    }
    println!("{}", spawner::stop_orphan(group)?);
    Ok(())
}
