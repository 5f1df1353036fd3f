package fleet

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"
)

// errSpoolFull is returned when the next event would take the spool past its
// cap (RecorderOptions.MaxSpoolBytes).
var errSpoolFull = errors.New("event spool is at its cap")

// spoolFile is the append-only JSON-lines file that keeps connection events
// while the database cannot take them. Every method does file I/O: the
// recorder calls them with Recorder.fileMu held, never Recorder.mu, so that
// Record never waits behind a disk write, a copy or an fsync.
type spoolFile struct {
	path string
	// max caps the file's size in bytes; 0 means no cap.
	max int64
	// hook, when set (tests), is called with "fsync" before an append syncs
	// the file and with "trim" before a trim copies it.
	hook func(op string)

	size int64     // bytes in the file
	at   time.Time // time of its first event; zero when empty
}

func (s *spoolFile) called(op string) {
	if s.hook != nil {
		s.hook(op)
	}
}

// open takes over the spool a previous run left: its size, the time of its
// first event, and a final newline, without which the first event appended
// now would merge with a line cut by a crash and be lost with it.
func (s *spoolFile) open() error {
	f, err := os.OpenFile(s.path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open event spool: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("open event spool: %w", err)
	}
	s.size = st.Size()
	if s.size == 0 {
		return nil
	}
	last := make([]byte, 1)
	if _, err := f.ReadAt(last, s.size-1); err != nil {
		return fmt.Errorf("read event spool: %w", err)
	}
	if last[0] != '\n' {
		if _, err := f.WriteAt([]byte{'\n'}, s.size); err != nil {
			return fmt.Errorf("repair event spool: %w", err)
		}
		if err := f.Sync(); err != nil {
			return fmt.Errorf("repair event spool: %w", err)
		}
		s.size++
	}
	if s.at = firstSpooledAt(f); s.at.IsZero() {
		s.at = time.Now() // unknown, but at least as old as this start
	}
	return nil
}

// append writes the longest prefix of events that fits under the cap as JSON
// lines, fsyncs, and returns how many it wrote. When not all fit it returns
// errSpoolFull with the count. An empty spool takes its first event whatever
// its size, so that an event longer than the cap cannot stall the spool. On any other error nothing is kept: the file is
// cut back to its previous size, so that a half-written line cannot swallow
// the first event of the next append.
func (s *spoolFile) append(events []Event) (int, error) {
	var line bytes.Buffer
	enc := json.NewEncoder(&line)
	var f *os.File
	var w *bufio.Writer
	size, n := s.size, 0
	fail := func(err error) (int, error) {
		if f != nil {
			_ = f.Truncate(s.size)
			f.Close()
		}
		return 0, err
	}
	for i := range events {
		line.Reset()
		if err := enc.Encode(&events[i]); err != nil {
			return fail(fmt.Errorf("encode event %s: %w", events[i].ID, err))
		}
		if s.max > 0 && size+int64(line.Len()) > s.max && size > 0 {
			break
		}
		if f == nil {
			var err error
			if f, err = os.OpenFile(s.path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600); err != nil {
				return 0, err
			}
			w = bufio.NewWriterSize(f, 64*1024)
		}
		if _, err := w.Write(line.Bytes()); err != nil {
			return fail(err)
		}
		size += int64(line.Len())
		n++
	}
	if f != nil {
		if err := w.Flush(); err != nil {
			return fail(err)
		}
		s.called("fsync")
		if err := f.Sync(); err != nil {
			return fail(err)
		}
		f.Close() // the lines are synced: a close error cannot lose them
		if s.size == 0 || s.at.IsZero() {
			s.at = oldestAt(events[:n])
		}
		s.size = size
	}
	if n < len(events) {
		return n, errSpoolFull
	}
	return n, nil
}

// trim drops the first n bytes of the spool (they are stored now): the rest
// is copied to a new file that replaces it, or the file is removed when
// nothing is left.
func (s *spoolFile) trim(n int64) error {
	s.called("trim")
	if s.size == n {
		if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		s.size, s.at = 0, time.Time{}
		return nil
	}
	src, err := os.Open(s.path)
	if err != nil {
		return err
	}
	defer src.Close()
	if _, err := src.Seek(n, io.SeekStart); err != nil {
		return err
	}
	tmp := s.path + ".tmp"
	dst, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer dst.Close()
	written, err := io.Copy(dst, src)
	if err == nil {
		err = dst.Sync()
	}
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, s.path); err != nil {
		return err
	}
	s.size = written
	s.at = firstSpooledAt(dst)
	return nil
}

// oldestAt is the earliest time of events, ignoring zero times.
func oldestAt(events []Event) time.Time {
	var t time.Time
	for i := range events {
		if at := events[i].At; !at.IsZero() && (t.IsZero() || at.Before(t)) {
			t = at
		}
	}
	return t
}

// firstSpooledAt is the time of the first readable event of a spool file, or
// zero when it has none.
func firstSpooledAt(f io.ReaderAt) time.Time {
	lines := newSpoolLines(io.NewSectionReader(f, 0, 1<<62))
	for {
		l, err := lines.next()
		if err != nil {
			return time.Time{}
		}
		var e Event
		if !l.tooLong && json.Unmarshal(l.data, &e) == nil && !e.At.IsZero() {
			return e.At
		}
	}
}

// maxSpoolLine bounds the memory one spooled event may take during a replay;
// a longer line is skipped rather than stopping the replay.
const maxSpoolLine = 16 << 20

var errTooLong = fmt.Errorf("line longer than %d bytes", maxSpoolLine)

// spoolLine is one line of the spool, without its newline.
type spoolLine struct {
	data    []byte // the line, or only its start when tooLong
	size    int    // the whole line's length
	tooLong bool
}

// spoolLines reads the spool line by line, whatever the lines' lengths.
type spoolLines struct {
	br  *bufio.Reader
	buf []byte
}

func newSpoolLines(r io.Reader) *spoolLines {
	return &spoolLines{br: bufio.NewReaderSize(r, 64*1024)}
}

// next returns the next line, valid until the following call, or io.EOF.
func (s *spoolLines) next() (spoolLine, error) {
	l := spoolLine{}
	s.buf = s.buf[:0]
	for {
		chunk, err := s.br.ReadSlice('\n')
		l.size += len(chunk)
		if !l.tooLong && len(s.buf)+len(chunk) <= maxSpoolLine {
			s.buf = append(s.buf, chunk...)
		} else {
			l.tooLong = true
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if err != nil && !(errors.Is(err, io.EOF) && l.size > 0) {
			return l, err
		}
		if n := len(chunk); n > 0 && chunk[n-1] == '\n' {
			l.size--
			if !l.tooLong {
				s.buf = s.buf[:len(s.buf)-1]
			}
		}
		l.data = s.buf
		return l, nil
	}
}
