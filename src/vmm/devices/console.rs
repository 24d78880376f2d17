//! The sink behind the serial console.

use std::fs::File;
use std::io::{self, Write};

use crate::vmm::config::ConsoleOutput;
use crate::vmm::error::{Error, Result};

pub type ConsoleWriter = Box<dyn Write + Send>;

/// Opens what the config asks for. Files are opened unbuffered on purpose:
/// whatever the guest printed before it died must already be on disk.
pub fn open(output: ConsoleOutput) -> Result<ConsoleWriter> {
    Ok(match output {
        ConsoleOutput::Null => Box::new(io::sink()),
        ConsoleOutput::Stdout => Box::new(io::stdout()),
        ConsoleOutput::File(path) => {
            Box::new(File::create(&path).map_err(|source| Error::Console { path, source })?)
        }
        ConsoleOutput::Writer(w) => w,
    })
}
