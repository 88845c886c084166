package main

// The dashboard as Grafana reads it: panels in rows on a 24-column grid, each
// with PromQL targets whose $variables Grafana substitutes before it sends
// them to Prometheus.

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/prometheus/prometheus/promql/parser"
)

type gridPos struct {
	H int `json:"h"`
	W int `json:"w"`
	X int `json:"x"`
	Y int `json:"y"`
}

type target struct {
	Expr         string `json:"expr"`
	LegendFormat string `json:"legendFormat"`
	RefID        string `json:"refId"`
}

type panel struct {
	ID          int      `json:"id"`
	Type        string   `json:"type"`
	Title       string   `json:"title"`
	Description string   `json:"description"`
	GridPos     gridPos  `json:"gridPos"`
	Targets     []target `json:"targets"`
	Panels      []panel  `json:"panels"` // a collapsed row keeps its panels here
	FieldConfig struct {
		Defaults struct {
			Unit string `json:"unit"`
		} `json:"defaults"`
	} `json:"fieldConfig"`
}

type dashboard struct {
	Title      string  `json:"title"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []struct {
			Name       string `json:"name"`
			Type       string `json:"type"`
			IncludeAll bool   `json:"includeAll"`
			AllValue   string `json:"allValue"`
		} `json:"list"`
	} `json:"templating"`
}

func loadDashboard(path string) (*dashboard, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &d, nil
}

// placed is a panel with the title of the row it sits in.
type placed struct {
	panel
	Row string
}

// panels lists the dashboard's panels that draw something, in order, each
// with its row: a row's panels are those after it up to the next row (or,
// collapsed, those it holds).
func (d *dashboard) panels() []placed {
	var out []placed
	row := ""
	for _, p := range d.Panels {
		if p.Type == "row" {
			row = p.Title
			for _, q := range p.Panels {
				out = append(out, placed{q, row})
			}
			continue
		}
		out = append(out, placed{p, row})
	}
	return out
}

// The built-in interval variables Grafana substitutes in a Prometheus query.
var intervalVars = map[string]bool{"__rate_interval": true, "__interval": true, "__range": true}

var varRef = regexp.MustCompile(`\$\{(\w+)\}|\$(\w+)|\[\[(\w+)\]\]`)

// expand substitutes Grafana's variables in expr: each template variable
// by what "All" selects (its allValue), the interval variables by vals.
// A variable the dashboard does not define is an error.
func (d *dashboard) expand(expr string, vals map[string]string) (string, error) {
	all := map[string]string{}
	for _, v := range d.Templating.List {
		if v.IncludeAll && v.AllValue != "" {
			all[v.Name] = v.AllValue
		}
	}
	var bad []string
	out := varRef.ReplaceAllStringFunc(expr, func(m string) string {
		s := varRef.FindStringSubmatch(m)
		name := s[1] + s[2] + s[3]
		if v, ok := vals[name]; ok {
			return v
		}
		if v, ok := all[name]; ok {
			return v
		}
		bad = append(bad, m)
		return m
	})
	if len(bad) > 0 {
		return "", fmt.Errorf("undefined variable %s (the dashboard's template variables with an All value, and %s, are known)",
			strings.Join(bad, ", "), "$__rate_interval, $__interval, $__range")
	}
	return out, nil
}

// instanceSentinel stands for $instance in the check: every selector must
// carry it, so that the Agent picker filters every panel.
const instanceSentinel = "__stead_check_instance__"

// check parses every target of every panel with Grafana's variables
// substituted, and requires each selector to name a stead_ series and to
// filter on instance=~"$instance". It returns one error per bad target.
func (d *dashboard) check() []error {
	var errs []error
	vals := map[string]string{"instance": instanceSentinel}
	for name := range intervalVars {
		vals[name] = "1m"
	}
	p := parser.NewParser(parser.Options{})
	n := 0
	for _, pl := range d.panels() {
		if len(pl.Targets) == 0 {
			errs = append(errs, fmt.Errorf("panel %q (row %q): no targets", pl.Title, pl.Row))
		}
		for _, t := range pl.Targets {
			n++
			fail := func(format string, a ...any) {
				errs = append(errs, fmt.Errorf("panel %q target %s: %s: %s", pl.Title, t.RefID, fmt.Sprintf(format, a...), t.Expr))
			}
			q, err := d.expand(t.Expr, vals)
			if err != nil {
				fail("%v", err)
				continue
			}
			expr, err := p.ParseExpr(q)
			if err != nil {
				fail("does not parse: %v", err)
				continue
			}
			parser.Inspect(expr, func(node parser.Node, _ []parser.Node) error {
				vs, ok := node.(*parser.VectorSelector)
				if !ok {
					return nil
				}
				if !strings.HasPrefix(vs.Name, "stead_") {
					fail("selector %s names no stead_ series", strings.ReplaceAll(vs.String(), instanceSentinel, "$instance"))
				}
				filtered := false
				for _, m := range vs.LabelMatchers {
					if m.Name == "instance" && m.Value == instanceSentinel {
						filtered = true
					}
				}
				if !filtered {
					fail(`selector %s does not filter on instance=~"$instance"`, strings.ReplaceAll(vs.String(), instanceSentinel, "$instance"))
				}
				return nil
			})
		}
	}
	if n == 0 {
		errs = append(errs, fmt.Errorf("the dashboard has no targets"))
	}
	return errs
}

// rateInterval is what Grafana substitutes for $__rate_interval:
// max($__interval + scrape interval, 4 × scrape interval), the scrape
// interval being the data source's setting (here: the capture's).
func rateInterval(step, scrape time.Duration) time.Duration {
	return max(step+scrape, 4*scrape)
}
