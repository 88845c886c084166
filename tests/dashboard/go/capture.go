package main

// A capture as tests/dashboard/capture.sh writes it, loaded the
// way Prometheus' scrape loop would have: every sample of a scrape at the
// scrape's time with the target's instance and job labels, an `up` series,
// and a stale marker for each series a scrape no longer has (or for all of
// them when a scrape failed).
//
//	<dir>/meta                          interval=<seconds> (and what was scraped)
//	<dir>/scrapes/<instance>/<ms>.om    a scrape's OpenMetrics text, ms since the epoch
//	<dir>/scrapes/<instance>/<ms>.err   a scrape that failed, and why

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/textparse"
	"github.com/prometheus/prometheus/model/value"
)

const job = "stead"

type scrape struct {
	instance string
	ms       int64
	path     string
	failed   bool
}

type capture struct {
	dir       string
	interval  time.Duration
	scrapes   []scrape // by time
	instances []string
}

func openCapture(dir string) (*capture, error) {
	c := &capture{dir: dir}
	meta, err := os.ReadFile(filepath.Join(dir, "meta"))
	if err != nil {
		return nil, fmt.Errorf("capture %s: %w", dir, err)
	}
	sc := bufio.NewScanner(strings.NewReader(string(meta)))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "interval="); ok {
			s, err := strconv.ParseFloat(v, 64)
			if err != nil || s <= 0 {
				return nil, fmt.Errorf("capture %s: meta: interval=%s is no number of seconds", dir, v)
			}
			c.interval = time.Duration(s * float64(time.Second))
		}
	}
	if c.interval == 0 {
		return nil, fmt.Errorf("capture %s: meta has no interval=", dir)
	}
	insts, err := os.ReadDir(filepath.Join(dir, "scrapes"))
	if err != nil {
		return nil, fmt.Errorf("capture %s: %w", dir, err)
	}
	for _, inst := range insts {
		if !inst.IsDir() {
			continue
		}
		c.instances = append(c.instances, inst.Name())
		files, err := os.ReadDir(filepath.Join(dir, "scrapes", inst.Name()))
		if err != nil {
			return nil, err
		}
		for _, f := range files {
			name, ext := f.Name(), filepath.Ext(f.Name())
			if ext != ".om" && ext != ".err" {
				continue // a scrape still being written is <ms>.om.part
			}
			ms, err := strconv.ParseInt(strings.TrimSuffix(name, ext), 10, 64)
			if err != nil {
				return nil, fmt.Errorf("capture %s: %s/%s is not <ms>.om or <ms>.err", dir, inst.Name(), name)
			}
			c.scrapes = append(c.scrapes, scrape{inst.Name(), ms, filepath.Join(dir, "scrapes", inst.Name(), name), ext == ".err"})
		}
	}
	if len(c.scrapes) == 0 {
		return nil, fmt.Errorf("capture %s: no scrapes", dir)
	}
	sort.SliceStable(c.scrapes, func(i, j int) bool { return c.scrapes[i].ms < c.scrapes[j].ms })
	return c, nil
}

func (c *capture) first() int64 { return c.scrapes[0].ms }
func (c *capture) last() int64  { return c.scrapes[len(c.scrapes)-1].ms }

// parse reads one scrape's samples, labelled with its target.
func parse(s scrape) ([]labels.Labels, []float64, error) {
	b, err := os.ReadFile(s.path)
	if err != nil {
		return nil, nil, err
	}
	if !strings.HasSuffix(string(b), "# EOF\n") {
		return nil, nil, errors.New("no # EOF at its end: the scrape was cut short")
	}
	p, err := textparse.New(b, "application/openmetrics-text; version=1.0.0", nil, textparse.ParserOptions{
		// The _created series: Prometheus keeps them as start timestamps, not samples.
		OpenMetricsSkipSTSeries: true,
	})
	if err != nil {
		return nil, nil, err
	}
	var ls []labels.Labels
	var vs []float64
	for {
		e, err := p.Next()
		if errors.Is(err, io.EOF) {
			return ls, vs, nil
		}
		if err != nil {
			return nil, nil, err
		}
		switch e {
		case textparse.EntrySeries:
			_, ts, v := p.Series()
			if ts != nil {
				return nil, nil, errors.New("a sample carries its own timestamp: the agent never writes one")
			}
			var l labels.Labels
			p.Labels(&l)
			b := labels.NewBuilder(l)
			b.Set("instance", s.instance)
			b.Set("job", job)
			ls = append(ls, b.Labels())
			vs = append(vs, v)
		case textparse.EntryHistogram:
			return nil, nil, errors.New("a native histogram: the agent exposes classic ones only")
		}
	}
}

// load appends the capture to db as Prometheus' scrape loop would.
// Failed scrapes (an .err file, or a body cut short) are reported on stderr
// and count as scrapes with up=0.
func (c *capture) load(db *memStorage) error {
	stale := math.Float64frombits(value.StaleNaN)
	prev := map[string]map[string]labels.Labels{} // instance → series of its last scrape
	for _, s := range c.scrapes {
		var ls []labels.Labels
		var vs []float64
		up := 1.0
		if s.failed {
			why, _ := os.ReadFile(s.path)
			fmt.Fprintf(os.Stderr, "dashboard: scrape of %s at %s failed: %s\n", s.instance, time.UnixMilli(s.ms).UTC().Format(time.TimeOnly), strings.TrimSpace(string(why)))
			up = 0
		} else {
			var err error
			ls, vs, err = parse(s)
			if err != nil {
				fmt.Fprintf(os.Stderr, "dashboard: %s: %v (counted as a failed scrape)\n", s.path, err)
				ls, vs, up = nil, nil, 0
			}
		}
		ls = append(ls, labels.FromStrings("__name__", "up", "instance", s.instance, "job", job))
		vs = append(vs, up)

		seen := map[string]labels.Labels{}
		for i, l := range ls {
			seen[l.String()] = l
			if err := db.add(l, s.ms, vs[i]); err != nil {
				return fmt.Errorf("%s: %s: %w", s.path, l, err)
			}
		}
		for k, l := range prev[s.instance] {
			if _, ok := seen[k]; !ok {
				if err := db.add(l, s.ms, stale); err != nil {
					return fmt.Errorf("%s: stale marker of %s: %w", s.path, l, err)
				}
			}
		}
		prev[s.instance] = seen
	}
	return nil
}
