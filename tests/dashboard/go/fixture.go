package main

// The dashboard evaluated over the agent's every family: a capture made of
// testdata/every-family.om (the series the agent exposes, as
// src/metrics.rs's test the_dashboards_fixture_has_every_series_the_agent_exposes
// keeps it), scraped ten times 5 s apart with every counter and histogram
// sample grown at each scrape. A target that selects nothing there names a
// series or a label value the agent does not have.

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

const fixtureScrapes = 10

// grown is the fixture's text at scrape i: counter-like samples times i+1.
func grown(text string, i int) (string, error) {
	var b strings.Builder
	for _, l := range strings.SplitAfter(text, "\n") {
		if l == "" || strings.HasPrefix(l, "#") {
			b.WriteString(l)
			continue
		}
		series, v, ok := strings.Cut(strings.TrimSuffix(l, "\n"), " ")
		name, _, _ := strings.Cut(series, "{")
		if !ok {
			return "", fmt.Errorf("no value on the line %q", l)
		}
		if strings.HasSuffix(name, "_total") || strings.HasSuffix(name, "_count") ||
			strings.HasSuffix(name, "_sum") || strings.HasSuffix(name, "_bucket") {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				return "", fmt.Errorf("line %q: %w", l, err)
			}
			v = strconv.FormatFloat(f*float64(i+1), 'g', -1, 64)
		}
		fmt.Fprintf(&b, "%s %s\n", series, v)
	}
	return b.String(), nil
}

// checkOverFixture evaluates every target over the fixture's capture and
// returns an error for each that fails or selects nothing.
func checkOverFixture(d *dashboard, fixture string) ([]error, error) {
	text, err := os.ReadFile(fixture)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "stead-dashboard-fixture-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	inst := filepath.Join(dir, "scrapes", "fixture")
	if err := os.MkdirAll(inst, 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "meta"), []byte("interval=5\n"), 0o644); err != nil {
		return nil, err
	}
	t0 := int64(1_800_000_000_000)
	for i := range fixtureScrapes {
		body, err := grown(string(text), i)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", fixture, err)
		}
		if err := os.WriteFile(filepath.Join(inst, fmt.Sprintf("%d.om", t0+int64(i)*5000)), []byte(body), 0o644); err != nil {
			return nil, err
		}
	}
	c, err := openCapture(dir)
	if err != nil {
		return nil, err
	}
	out, err := evaluate(d, c, 0)
	if err != nil {
		return []error{err}, nil
	}
	var errs []error
	for _, p := range out.Panels {
		for _, t := range p.Targets {
			if len(t.Series) == 0 {
				errs = append(errs, fmt.Errorf("panel %q target %s: selects no series of the agent's every family (%s): %s", p.Title, t.RefID, fixture, t.Expr))
			}
		}
	}
	return errs, nil
}
