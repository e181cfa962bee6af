//! COM1: a 16550 UART emulated by vm-superio, polled by the guest (no IRQ).

use std::collections::VecDeque;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::error::{Error, Result};
use crate::persist::{Codec, Persist, Reader, Writer};

/// Interrupt trigger that does nothing: the test guest polls LSR.
#[derive(Debug, Default)]
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> std::result::Result<(), Self::E> {
        Ok(())
    }
}

/// Collects the bytes the guest transmits.
#[derive(Debug, Default)]
pub struct OutBuf(pub Vec<u8>);

impl std::io::Write for OutBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Largest input backlog kept in a state blob.
pub const MAX_PENDING_INPUT: usize = 16 << 20;

/// The UART plus the VMM-side input backlog (bytes not yet in the 64-byte FIFO).
pub struct SerialDevice {
    uart: Serial<NoIrq, NoEvents, OutBuf>,
    pending: VecDeque<u8>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Default for SerialDevice {
    fn default() -> Self {
        SerialDevice {
            uart: Serial::new(NoIrq, OutBuf::default()),
            pending: VecDeque::new(),
        }
    }
}

impl SerialDevice {
    /// Guest IN from register `offset` (0..8).
    pub fn read(&mut self, offset: u8) -> u8 {
        let v = self.uart.read(offset);
        self.refill();
        v
    }

    /// Guest OUT to register `offset`.
    pub fn write(&mut self, offset: u8, v: u8) {
        // The trigger cannot fail and the writer never fails.
        let _ = self.uart.write(offset, v);
    }

    /// Takes the bytes the guest transmitted since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.uart.writer_mut().0)
    }

    /// Queues bytes for the guest.
    pub fn push_input(&mut self, bytes: &[u8]) {
        self.pending.extend(bytes);
        self.refill();
    }

    /// True if the guest has something to read (FIFO or backlog).
    pub fn has_input(&self) -> bool {
        self.uart.fifo_capacity() < 64 || !self.pending.is_empty()
    }

    fn refill(&mut self) {
        while !self.pending.is_empty() && self.uart.fifo_capacity() > 0 {
            let (a, _) = self.pending.as_slices();
            let n = a.len().min(self.uart.fifo_capacity());
            match self.uart.enqueue_raw_bytes(&a[..n]) {
                Ok(k) if k > 0 => {
                    self.pending.drain(..k);
                }
                _ => break,
            }
        }
    }
}

/// Saved UART registers, FIFO and backlog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialDeviceState {
    /// vm-superio's register state (FIFO included).
    pub uart: SerialState,
    /// Input not yet in the FIFO.
    pub pending: Vec<u8>,
}

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    type Args = ();

    fn save(&self) -> Result<SerialDeviceState> {
        Ok(SerialDeviceState {
            uart: self.uart.state(),
            pending: self.pending.iter().copied().collect(),
        })
    }

    fn restore(_: (), s: &SerialDeviceState) -> Result<SerialDevice> {
        let uart = Serial::from_state(&s.uart, NoIrq, NoEvents, OutBuf::default())
            .map_err(|e| Error::corrupt(format!("serial state: {e:?}")))?;
        Ok(SerialDevice {
            uart,
            pending: s.pending.iter().copied().collect(),
        })
    }
}

impl Codec for SerialDeviceState {
    fn encode(&self, w: &mut Writer) {
        let u = &self.uart;
        for b in [
            u.baud_divisor_low,
            u.baud_divisor_high,
            u.interrupt_enable,
            u.interrupt_identification,
            u.line_control,
            u.line_status,
            u.modem_control,
            u.modem_status,
            u.scratch,
        ] {
            w.u8(b);
        }
        w.bytes(&u.in_buffer);
        w.bytes(&self.pending);
    }

    fn decode(r: &mut Reader<'_>) -> Result<SerialDeviceState> {
        let mut regs = [0u8; 9];
        for b in &mut regs {
            *b = r.u8()?;
        }
        let in_buffer = r.bytes(64, "serial FIFO")?.to_vec();
        let pending = r.bytes(MAX_PENDING_INPUT, "serial input backlog")?.to_vec();
        Ok(SerialDeviceState {
            uart: SerialState {
                baud_divisor_low: regs[0],
                baud_divisor_high: regs[1],
                interrupt_enable: regs[2],
                interrupt_identification: regs[3],
                line_control: regs[4],
                line_status: regs[5],
                modem_control: regs[6],
                modem_status: regs[7],
                scratch: regs[8],
                in_buffer,
            },
            pending,
        })
    }
}
