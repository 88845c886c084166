// Command dashboard is the PromQL check of Stead's Grafana dashboard and the
// evaluation behind docs/dashboard.png, on Prometheus' own PromQL engine (see
// tests/dashboard/README.md).
//
//	dashboard --check --dashboard stead-dashboard.json [--fixture every-family.om]
//	    every target parses with Grafana's variables substituted, and every
//	    selector names a stead_ series and filters on instance=~"$instance";
//	    with a fixture, every target evaluates over it and selects series
//	dashboard --dashboard stead-dashboard.json --capture DIR --out series.json
//	    the check, then the capture loaded and every target run
//	    as a range query over it, $instance being All; the series as JSON
//
// Any target that fails is an error naming the panel and the expression.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math"
	"os"
	"regexp"
	"sort"
	"strconv"
	"time"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql"
)

type seriesOut struct {
	Legend string            `json:"legend"`
	Labels map[string]string `json:"labels"`
	// [unix seconds, value]; a value that JSON has no number for (NaN,
	// ±Inf: a quantile of no observations, or in the +Inf bucket) as the
	// string Prometheus' API would send.
	Points [][2]any `json:"points"`
}

type targetOut struct {
	RefID  string      `json:"refId"`
	Expr   string      `json:"expr"`  // as written in the dashboard
	Query  string      `json:"query"` // as sent to the engine
	Series []seriesOut `json:"series"`
}

type panelOut struct {
	Title   string      `json:"title"`
	Type    string      `json:"type"`
	Row     string      `json:"row"`
	Unit    string      `json:"unit"`
	GridPos gridPos     `json:"gridPos"`
	Targets []targetOut `json:"targets"`
}

type rowOut struct {
	Title string `json:"title"`
	Y     int    `json:"y"`
}

type output struct {
	Dashboard      string     `json:"dashboard"`
	Start          float64    `json:"start"`
	End            float64    `json:"end"`
	Step           string     `json:"step"`
	ScrapeInterval string     `json:"scrape_interval"`
	RateInterval   string     `json:"rate_interval"`
	Instances      []string   `json:"instances"`
	Scrapes        int        `json:"scrapes"`
	Rows           []rowOut   `json:"rows"`
	Panels         []panelOut `json:"panels"`
}

func main() {
	dashPath := flag.String("dashboard", "", "the Grafana dashboard JSON")
	checkOnly := flag.Bool("check", false, "only check the dashboard (no capture): every target parses, and selects series of --fixture")
	fixture := flag.String("fixture", "", "with --check: the agent's every family (testdata/every-family.om), every target evaluated over it")
	captureDir := flag.String("capture", "", "a capture of tests/dashboard/capture.sh")
	outPath := flag.String("out", "", "where the series go (JSON)")
	step := flag.Duration("step", 0, "the range queries' step ($__interval); 0: the scrape interval, or range/300 when larger")
	flag.Parse()
	if *dashPath == "" || (!*checkOnly && (*captureDir == "" || *outPath == "")) {
		fmt.Fprintln(os.Stderr, "usage: dashboard --dashboard FILE (--check [--fixture FILE] | --capture DIR --out FILE [--step D])")
		os.Exit(2)
	}
	if err := run(*dashPath, *checkOnly, *fixture, *captureDir, *outPath, *step); err != nil {
		fmt.Fprintf(os.Stderr, "dashboard: %v\n", err)
		os.Exit(1)
	}
}

func run(dashPath string, checkOnly bool, fixture, captureDir, outPath string, step time.Duration) error {
	d, err := loadDashboard(dashPath)
	if err != nil {
		return err
	}
	if errs := d.check(); len(errs) > 0 {
		return fmt.Errorf("%s: %d bad targets:\n%w", dashPath, len(errs), errors.Join(errs...))
	}
	n := 0
	for _, p := range d.panels() {
		n += len(p.Targets)
	}
	if checkOnly {
		also := ""
		if fixture != "" {
			errs, err := checkOverFixture(d, fixture)
			if err != nil {
				return err
			}
			if len(errs) > 0 {
				return fmt.Errorf("%s: %d bad targets:\n%w", dashPath, len(errs), errors.Join(errs...))
			}
			also = ", evaluates without a warning and selects series of the agent's every family"
		}
		fmt.Fprintf(os.Stderr, "dashboard: %s: %d panels, %d targets: every one parses, filters on $instance%s\n", dashPath, len(d.panels()), n, also)
		return nil
	}
	c, err := openCapture(captureDir)
	if err != nil {
		return err
	}
	out, err := evaluate(d, c, step)
	if err != nil {
		return err
	}
	out.Dashboard = d.Title
	b, err := json.MarshalIndent(out, "", " ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(outPath, append(b, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "dashboard: %d targets evaluated over %d scrapes of %d instances (%s, step %s, $__rate_interval %s) into %s\n",
		n, out.Scrapes, len(out.Instances), time.Duration(out.End-out.Start)*time.Second, out.Step, out.RateInterval, outPath)
	return nil
}

func evaluate(d *dashboard, c *capture, step time.Duration) (*output, error) {
	ctx := context.Background()
	quiet := slog.New(slog.DiscardHandler)
	db := newMemStorage()
	if err := c.load(db); err != nil {
		return nil, err
	}

	span := time.Duration(c.last()-c.first()) * time.Millisecond
	if step == 0 {
		// As Grafana's $__interval: the panel's range over its data points,
		// never below the data source's scrape interval.
		step = max(c.interval, (span / 300).Round(time.Second))
	}
	rate := rateInterval(step, c.interval)
	vals := map[string]string{
		"__rate_interval": model.Duration(rate).String(),
		"__interval":      model.Duration(step).String(),
		"__range":         model.Duration(span.Round(time.Second)).String(),
	}
	stepMs := step.Milliseconds()
	start := time.UnixMilli(c.first() / stepMs * stepMs)
	end := time.UnixMilli((c.last() + stepMs - 1) / stepMs * stepMs)

	engine := promql.NewEngine(promql.EngineOpts{
		Logger:        quiet,
		MaxSamples:    50_000_000,
		Timeout:       time.Minute,
		LookbackDelta: 5 * time.Minute, // Prometheus' default
	})
	out := &output{
		Start:          float64(start.Unix()),
		End:            float64(end.Unix()),
		Step:           model.Duration(step).String(),
		ScrapeInterval: model.Duration(c.interval).String(),
		RateInterval:   vals["__rate_interval"],
		Instances:      c.instances,
		Scrapes:        len(c.scrapes),
	}
	for _, p := range d.Panels {
		if p.Type == "row" {
			out.Rows = append(out.Rows, rowOut{p.Title, p.GridPos.Y})
		}
	}
	var errs []error
	for _, pl := range d.panels() {
		po := panelOut{Title: pl.Title, Type: pl.Type, Row: pl.Row, Unit: pl.FieldConfig.Defaults.Unit, GridPos: pl.GridPos}
		for _, t := range pl.Targets {
			fail := func(format string, a ...any) {
				errs = append(errs, fmt.Errorf("panel %q target %s: %s: %s", pl.Title, t.RefID, fmt.Sprintf(format, a...), t.Expr))
			}
			q, err := d.expand(t.Expr, vals)
			if err != nil {
				fail("%v", err)
				continue
			}
			qry, err := engine.NewRangeQuery(ctx, db, nil, q, start, end, step)
			if err != nil {
				fail("%v", err)
				continue
			}
			res := qry.Exec(ctx)
			if res.Err != nil {
				fail("evaluation failed: %v", res.Err)
				qry.Close()
				continue
			}
			// Warnings and infos (a rate of what is no counter, buckets out
			// of order) are the engine saying the query is wrong.
			for _, w := range res.Warnings.AsErrors() {
				fail("%v", w)
			}
			m, err := res.Matrix()
			if err != nil {
				fail("%v", err)
				qry.Close()
				continue
			}
			to := targetOut{RefID: t.RefID, Expr: t.Expr, Query: q}
			for _, s := range m {
				so := seriesOut{Legend: legend(t.LegendFormat, s.Metric), Labels: s.Metric.Map()}
				for _, f := range s.Floats {
					var v any = f.F
					if math.IsNaN(f.F) || math.IsInf(f.F, 0) {
						v = strconv.FormatFloat(f.F, 'f', -1, 64)
					}
					so.Points = append(so.Points, [2]any{float64(f.T) / 1000, v})
				}
				to.Series = append(to.Series, so)
			}
			sort.Slice(to.Series, func(i, j int) bool { return to.Series[i].Legend < to.Series[j].Legend })
			po.Targets = append(po.Targets, to)
			qry.Close()
		}
		out.Panels = append(out.Panels, po)
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%d targets failed:\n%w", len(errs), errors.Join(errs...))
	}
	return out, nil
}

var legendRef = regexp.MustCompile(`\{\{\s*(\w+)\s*\}\}`)

// legend renders a Grafana legend format ({{label}}) for a series; without
// one, the series' labels as Grafana shows them.
func legend(format string, l labels.Labels) string {
	if format == "" || format == "__auto" {
		return l.String()
	}
	return legendRef.ReplaceAllStringFunc(format, func(m string) string {
		return l.Get(legendRef.FindStringSubmatch(m)[1])
	})
}
