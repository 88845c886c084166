package main

// memStorage is the capture in memory as the PromQL engine reads storage:
// a few thousand series of a few hundred float samples each. Prometheus'
// TSDB would do the same job with twice the dependencies (its package pulls
// the cloud SDKs of remote storage and service discovery into the build).

import (
	"context"
	"fmt"
	"slices"
	"sort"

	"github.com/prometheus/prometheus/model/histogram"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/storage"
	"github.com/prometheus/prometheus/tsdb/chunkenc"
	"github.com/prometheus/prometheus/tsdb/chunks"
	"github.com/prometheus/prometheus/util/annotations"
)

type fsample struct {
	t int64
	f float64
}

func (s fsample) T() int64                      { return s.t }
func (s fsample) ST() int64                     { return 0 }
func (s fsample) F() float64                    { return s.f }
func (s fsample) H() *histogram.Histogram       { return nil }
func (s fsample) FH() *histogram.FloatHistogram { return nil }
func (s fsample) Type() chunkenc.ValueType      { return chunkenc.ValFloat }
func (s fsample) Copy() chunks.Sample           { return s }

type memSeries struct {
	labels  labels.Labels
	samples []chunks.Sample
}

type memStorage struct {
	byKey  map[string]*memSeries
	sorted []*memSeries // by labels, made on the first query
}

func newMemStorage() *memStorage { return &memStorage{byKey: map[string]*memSeries{}} }

// add appends a sample; a series' samples must come in time order, as a
// scrape loop's do.
func (m *memStorage) add(l labels.Labels, t int64, f float64) error {
	k := l.String()
	s := m.byKey[k]
	if s == nil {
		s = &memSeries{labels: l}
		m.byKey[k] = s
		m.sorted = nil
	}
	if n := len(s.samples); n > 0 && s.samples[n-1].T() >= t {
		return fmt.Errorf("sample at %d not after the last one at %d", t, s.samples[n-1].T())
	}
	s.samples = append(s.samples, fsample{t, f})
	return nil
}

func (m *memStorage) Querier(mint, maxt int64) (storage.Querier, error) {
	if m.sorted == nil {
		for _, s := range m.byKey {
			m.sorted = append(m.sorted, s)
		}
		sort.Slice(m.sorted, func(i, j int) bool { return labels.Compare(m.sorted[i].labels, m.sorted[j].labels) < 0 })
	}
	return &memQuerier{m, mint, maxt}, nil
}

type memQuerier struct {
	m          *memStorage
	mint, maxt int64
}

func (q *memQuerier) matching(ms []*labels.Matcher) []*memSeries {
	var out []*memSeries
next:
	for _, s := range q.m.sorted {
		for _, m := range ms {
			if !m.Matches(s.labels.Get(m.Name)) {
				continue next
			}
		}
		out = append(out, s)
	}
	return out
}

func (q *memQuerier) Select(_ context.Context, _ bool, _ *storage.SelectHints, ms ...*labels.Matcher) storage.SeriesSet {
	set := &sliceSet{i: -1}
	for _, s := range q.matching(ms) {
		lo := sort.Search(len(s.samples), func(i int) bool { return s.samples[i].T() >= q.mint })
		hi := sort.Search(len(s.samples), func(i int) bool { return s.samples[i].T() > q.maxt })
		if lo < hi {
			set.series = append(set.series, storage.NewListSeries(s.labels, s.samples[lo:hi]))
		}
	}
	return set
}

func (q *memQuerier) LabelValues(_ context.Context, name string, _ *storage.LabelHints, ms ...*labels.Matcher) ([]string, annotations.Annotations, error) {
	var vs []string
	for _, s := range q.matching(ms) {
		if v := s.labels.Get(name); v != "" {
			vs = append(vs, v)
		}
	}
	slices.Sort(vs)
	return slices.Compact(vs), nil, nil
}

func (q *memQuerier) LabelNames(_ context.Context, _ *storage.LabelHints, ms ...*labels.Matcher) ([]string, annotations.Annotations, error) {
	var ns []string
	for _, s := range q.matching(ms) {
		s.labels.Range(func(l labels.Label) { ns = append(ns, l.Name) })
	}
	slices.Sort(ns)
	return slices.Compact(ns), nil, nil
}

func (q *memQuerier) Close() error { return nil }

type sliceSet struct {
	series []storage.Series
	i      int
}

func (s *sliceSet) Next() bool                        { s.i++; return s.i < len(s.series) }
func (s *sliceSet) At() storage.Series                { return s.series[s.i] }
func (s *sliceSet) Err() error                        { return nil }
func (s *sliceSet) Warnings() annotations.Annotations { return nil }
