//! A complete parsrv handler in a few lines: take the group socket parsrv passes (socket
//! activation), answer every HTTP request with who served it, on as many threads as
//! `parsrv run --threads` asks for.
//!
//!     parsrv run --listen 127.0.0.1:8080 --handlers 4 --threads 2 --handler exec -- \
//!         target/debug/examples/hello_handler

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() {
    let served = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(parsrv::activation::threads())
        .enable_all()
        .build()
        .map_err(Into::into)
        .and_then(|runtime| runtime.block_on(serve()));
    if let Err(e) = served {
        eprintln!("hello_handler: {e}");
        std::process::exit(1);
    }
}

async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let listener = parsrv::activation::tokio_listener()?;
    let body = format!("hello from pid {}\n", std::process::id());
    loop {
        let (mut conn, _) = listener.accept().await?;
        let body = body.clone();
        tokio::spawn(async move {
            read_request_head(&mut conn).await; // one request per connection
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
        });
    }
}

/// Reads until the end of the request's head (or 4096 bytes, EOF or an error). A client may
/// send its request in several segments: answering after the first and closing with the
/// rest unread would make the kernel reset the connection before the client reads the answer.
async fn read_request_head(conn: &mut (impl AsyncReadExt + Unpin)) {
    let mut head = [0u8; 4096];
    let mut len = 0;
    while len < head.len() && !head[..len].ends_with(b"\r\n\r\n") {
        match conn.read(&mut head[len..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
    }
}
